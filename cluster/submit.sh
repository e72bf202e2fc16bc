#!/usr/bin/env bash
# Submit a skinsynth experiment to a Ray cluster as a Ray job:
#   cluster/submit.sh experiments/ratio_sweep_gpu.yaml [--set key=value ...]           # skinsynth run: every stage
#   cluster/submit.sh tune experiments/ratio_sweep_gpu.yaml [--set key=value ...]      # one command, --config FILE
#   cluster/submit.sh evaluate experiments/ratio_sweep_gpu.yaml --set train.name=best
# A command other than `run` is any skinsynth command that takes --config (train, evaluate, tune, generate train,
# generate sample, data prepare, ...).
# RAY_ADDRESS selects the cluster's dashboard (default http://127.0.0.1:8265, e.g. through
# `ray dashboard cluster/ray-cluster.yaml` or a port-forward to the KubeRay head service).
# SUBMIT_RUNTIME_ENV names the runtime env file (default cluster/runtime_env.yaml, which pip-installs the
# dependencies; a cluster whose Python has them all, such as one started from this checkout's environment, can take a
# copy without its `pip` list).
# SUBMIT_NO_WAIT=1 returns as soon as the job is accepted and prints its id last; otherwise the logs are followed
# until it ends.
# Re-submitting the same experiment resumes it: finished stages are skipped (their manifests match) and an
# interrupted sweep continues without repeating finished trials. run.out must be storage every node reaches (an
# s3:// URI, or a path on a volume mounted on every node): a job's workers share no disk with the machine you submit
# from.
set -euo pipefail
cd "$(dirname "$0")/.."
command_words=()
while [[ $# -gt 0 && "$1" != *.yaml && "$1" != *.yml && "$1" != -* ]]; do
    command_words+=("$1")
    shift
done
if [[ $# -lt 1 || ! -f "$1" ]]; then
    echo "usage: cluster/submit.sh [COMMAND] EXPERIMENT.yaml [--set key=value ...]  (experiment file not found: ${1:-none})" >&2
    exit 2
fi
experiment="$1"
shift
runtime_env="${SUBMIT_RUNTIME_ENV:-cluster/runtime_env.yaml}"
if [[ ! -f "$runtime_env" ]]; then
    echo "cluster/submit.sh: runtime env file not found: $runtime_env (SUBMIT_RUNTIME_ENV)" >&2
    exit 2
fi
if [[ ${#command_words[@]} -eq 0 || "${command_words[*]}" == "run" ]]; then
    entrypoint=(python -m skinsynth run "$experiment")
    label=run
else
    entrypoint=(python -m skinsynth "${command_words[@]}" --config "$experiment")
    label=$(IFS=-; echo "${command_words[*]}")
fi
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
name="skinsynth-$label-$(basename "${experiment%.*}")-$(date +%Y%m%d-%H%M%S)-$$"
wait_flag=()
if [[ "${SUBMIT_NO_WAIT:-0}" == "1" ]]; then
    wait_flag=(--no-wait)
fi
echo "submitting ${entrypoint[*]} to $address as $name"
ray job submit --address "$address" --submission-id "$name" --runtime-env "$runtime_env" \
    "${wait_flag[@]}" -- "${entrypoint[@]}" "$@"
echo "logs: ray job logs --address $address $name   status: ray job status --address $address $name"
echo "submission id: $name"
