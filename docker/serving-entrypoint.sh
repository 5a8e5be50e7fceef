#!/bin/bash
# Entry point of the serving image: TorchServe and the KServe front in one container.
#   cxr-serving-entrypoint --ts-config FILE --model-store DIR [more torchserve flags]
# TorchServe (token authorization on) writes key_file.json in the working directory; the front
# (`python -m serving.front`) reads it and forwards to TorchServe on 127.0.0.1:$CXR_TORCHSERVE_PORT.
# Environment:
#   CXR_FRONT_HTTP_PORT (8080)  the front's port: what KServe routes to
#   CXR_TORCHSERVE_PORT (8085)  TorchServe's inference port (config.properties)
#   CXR_TORCHSERVE_MANAGEMENT_PORT (8081)  its management port, on 127.0.0.1 (worker state for readiness)
#   CXR_API_KEYS                caller:key[,caller:key] the front accepts (required by the front)
#   CXR_MODEL_NAME (cxr-screen) CXR_AUDIT_LOG_DIR (one <hostname>.jsonl per pod there)
#   CXR_FRONT_ARGS              more front flags, e.g. "--max-body-mb 32 --timeout-s 60"
#   CXR_TORCHSERVE_WORKERS      workers per model, replacing the package's (the chart renders CPU request /
#                               threads per worker; CXR_TORCH_THREADS sets each worker's threads)
# When either process exits the other is stopped and the container exits with the first one's
# status, so the kubelet restarts the pod instead of leaving a half-working server.
set -uo pipefail

workdir="${CXR_SERVING_WORKDIR:-$HOME}"
cd "$workdir" || exit 1
rm -f key_file.json

# The handler in TorchServe's workers writes the prediction lines, the front its refusals: both
# append (O_APPEND) to the same per-pod file on the audit volume.
if [[ -n "${CXR_AUDIT_LOG_DIR:-}" ]]; then
  mkdir -p "$CXR_AUDIT_LOG_DIR" || exit 1
  export CXR_AUDIT_LOG="$CXR_AUDIT_LOG_DIR/$(hostname).jsonl"
fi

# The package's config.properties fixed its worker count when it was built; this pod's CPUs decide.
args=("$@")
if [[ -n "${CXR_TORCHSERVE_WORKERS:-}" ]]; then
  for i in "${!args[@]}"; do
    if [[ "${args[$i]}" == "--ts-config" && -n "${args[$((i + 1))]:-}" ]]; then
      python -m serving.ts_config --workers "$CXR_TORCHSERVE_WORKERS" "${args[$((i + 1))]}" "$workdir/config.properties" \
        || exit 1
      args[$((i + 1))]="$workdir/config.properties"
    fi
  done
fi

torchserve --foreground --ncs "${args[@]}" &
torchserve_pid=$!

# The front needs TorchServe's key file; TorchServe writes it while it starts.
for _ in $(seq 120); do
  [[ -s key_file.json ]] && break
  kill -0 "$torchserve_pid" 2>/dev/null || { wait "$torchserve_pid"; exit $?; }
  sleep 0.5
done

torchserve_url="http://127.0.0.1:${CXR_TORCHSERVE_PORT:-8085}"
front_args=(
  --port "${CXR_FRONT_HTTP_PORT:-8080}"
  --torchserve-url "$torchserve_url"
  --management-url "http://127.0.0.1:${CXR_TORCHSERVE_MANAGEMENT_PORT:-8081}"
  --key-file "$workdir/key_file.json"
  --model-name "${CXR_MODEL_NAME:-cxr-screen}"
)
if [[ -n "${CXR_AUDIT_LOG:-}" ]]; then
  front_args+=(--audit-log "$CXR_AUDIT_LOG")
fi
# shellcheck disable=SC2086  # CXR_FRONT_ARGS is a list of words on purpose
python -m serving.front "${front_args[@]}" ${CXR_FRONT_ARGS:-} &
front_pid=$!

stop() {
  kill -TERM "$front_pid" "$torchserve_pid" 2>/dev/null
  wait "$front_pid" "$torchserve_pid" 2>/dev/null
}
trap 'stop; exit 143' TERM INT

wait -n "$torchserve_pid" "$front_pid"
status=$?
if ! kill -0 "$torchserve_pid" 2>/dev/null; then
  echo "cxr-serving-entrypoint: torchserve exited with status $status" >&2
else
  echo "cxr-serving-entrypoint: serving.front exited with status $status" >&2
fi
stop
exit "$status"
