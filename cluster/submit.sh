#!/usr/bin/env bash
# Submit a skinsynth experiment to a Ray cluster as a Ray job:
#   cluster/submit.sh experiments/ratio_sweep.yaml [--set key=value ...]
# RAY_ADDRESS selects the cluster's dashboard (default http://127.0.0.1:8265, e.g. through
# `ray dashboard cluster/ray-cluster.yaml` or a port-forward to the KubeRay head service).
# SUBMIT_NO_WAIT=1 returns as soon as the job is accepted; otherwise the logs are followed until it ends.
# Re-submitting the same experiment resumes it: finished stages are skipped (their manifests match) and an
# interrupted sweep continues without repeating finished trials.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 || ! -f "$1" ]]; then
    echo "usage: cluster/submit.sh EXPERIMENT.yaml [--set key=value ...]  (experiment file not found: ${1:-none})" >&2
    exit 2
fi
experiment="$1"
shift
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
name="skinsynth-$(basename "${experiment%.*}")-$(date +%Y%m%d-%H%M%S)"
wait_flag=()
if [[ "${SUBMIT_NO_WAIT:-0}" == "1" ]]; then
    wait_flag=(--no-wait)
fi
echo "submitting $experiment to $address as $name"
ray job submit --address "$address" --submission-id "$name" --runtime-env cluster/runtime_env.yaml \
    "${wait_flag[@]}" -- python -m skinsynth run "$experiment" "$@"
echo "logs: ray job logs --address $address $name   status: ray job status --address $address $name"
