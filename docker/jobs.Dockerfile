# cxr-screen jobs image: training, the Ray Tune sweep (KubeRay head and workers), the drift job,
# and the MLflow tracking server of the chart.
# Build from the repo root:  docker build -f docker/jobs.Dockerfile -t cxr-screen/jobs:0.1.0 .
# BASE_IMAGE: see serving.Dockerfile.

ARG BASE_IMAGE=cxr-screen/debian:bookworm

# --- build: the same locked environment as the serving image, plus the MLflow server extras -------
FROM ${BASE_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev build-essential ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
# build-ca.pem exists only when docker/build_images.sh is behind a TLS-inspecting proxy: it is the
# build host's CA bundle, used by pip in this stage and never copied into the runtime image.
COPY requirements.txt constraints.txt docker/build-ca.pe[m] /tmp/deps/
RUN if [ -f /tmp/deps/build-ca.pem ]; then export PIP_CERT=/tmp/deps/build-ca.pem; fi \
 && python3 -m venv /opt/venv \
 && pip install "pip==26.3" \
 && pip install -r /tmp/deps/requirements.txt -c /tmp/deps/constraints.txt
COPY docker/requirements-jobs-extra.txt /tmp/deps/
RUN if [ -f /tmp/deps/build-ca.pem ]; then export PIP_CERT=/tmp/deps/build-ca.pem; fi \
 && pip install -r /tmp/deps/requirements-jobs-extra.txt -c /tmp/deps/constraints.txt

# --- runtime -------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# wget: KubeRay's health probes call it inside Ray head and worker containers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 ca-certificates tini wget procps \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 ray \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/ray --shell /bin/bash ray
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY cxr_core/ /app/cxr_core/
COPY training/ /app/training/
COPY serving/ /app/serving/
COPY monitoring/ /app/monitoring/
COPY review/ /app/review/
COPY configs/ /app/configs/
COPY charts/__init__.py charts/kube.py charts/secrets.py /app/charts/
COPY docker/healthcheck.py /usr/local/bin/cxr-healthcheck
RUN chmod 0755 /usr/local/bin/cxr-healthcheck \
 && /opt/venv/bin/python -c "import ray, mlflow, psycopg2, boto3, cxr_core, training, monitoring, charts.kube, charts.secrets, monitoring.trigger"
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONPATH=/app PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 HOME=/home/ray
USER 1000:1000
WORKDIR /home/ray
# Batch jobs: healthy when the project imports; with CXR_HEALTH_URL set (e.g. the MLflow
# server's http://127.0.0.1:5000/health) that URL must answer too.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["/opt/venv/bin/python", "/usr/local/bin/cxr-healthcheck", "jobs"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "training.sweep", "--help"]
