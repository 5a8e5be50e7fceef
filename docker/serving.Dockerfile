# cxr-screen serving image: TorchServe + the KServe front (`python -m serving.front`) + the
# project's handler code. KServe mounts the storageUri folder at /mnt/models:
#   /mnt/models/config/config.properties, /mnt/models/model-store/cxr-screen.mar
# Build from the repo root:  docker build -f docker/serving.Dockerfile -t cxr-screen/serving:0.1.0 .
# BASE_IMAGE is a plain Debian 12 root filesystem (docker/build_images.sh makes one with
# debootstrap when no registry is reachable); Python 3.11 and Java 17 come from Debian 12.

ARG BASE_IMAGE=cxr-screen/debian:bookworm

# --- build: a virtual environment with the locked dependencies ---------------------------------
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

# --- runtime: no compilers, a non-root user --------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 openjdk-17-jre-headless ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 model-server \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/model-server --shell /bin/bash model-server \
 && mkdir -p /mnt/models \
 && chown 1000:1000 /mnt/models
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY cxr_core/ /app/cxr_core/
COPY training/ /app/training/
COPY serving/ /app/serving/
COPY monitoring/ /app/monitoring/
COPY configs/ /app/configs/
COPY docker/serving-entrypoint.sh /usr/local/bin/cxr-serving-entrypoint
COPY docker/healthcheck.py /usr/local/bin/cxr-healthcheck
RUN chmod 0755 /usr/local/bin/cxr-serving-entrypoint /usr/local/bin/cxr-healthcheck \
 && /opt/venv/bin/python -c "import torch, ts, kserve, cxr_core, serving"
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONPATH=/app PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 HOME=/home/model-server \
    CXR_SERVING_WORKDIR=/home/model-server \
    CXR_TORCHSERVE_PORT=8085 CXR_TORCHSERVE_MANAGEMENT_PORT=8081 CXR_FRONT_HTTP_PORT=8080
USER 1000:1000
WORKDIR /home/model-server
# 8080: the KServe front (what KServe routes to); 8085: TorchServe inference/management;
# 8082: TorchServe metrics.
EXPOSE 8080 8085 8082
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
  CMD ["/opt/venv/bin/python", "/usr/local/bin/cxr-healthcheck", "serving"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/cxr-serving-entrypoint"]
CMD ["--ts-config", "/mnt/models/config/config.properties", "--model-store", "/mnt/models/model-store"]
