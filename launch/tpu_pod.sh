#!/usr/bin/env bash
# Run agora_jax on a Cloud TPU VM pod slice: create it, copy this checkout (and ../shared/data),
# install on every worker, and launch the same command on all workers (jax.distributed).
#
#   launch/tpu_pod.sh create   NAME ZONE [ACCELERATOR=v5litepod-16] [VERSION=v2-alpha-tpuv5-lite]
#   launch/tpu_pod.sh copy     NAME ZONE
#   launch/tpu_pod.sh install  NAME ZONE
#   launch/tpu_pod.sh run      NAME ZONE --config=configs/debate.py:qwen2.5-7b --workdir=gs://BUCKET/run
#   launch/tpu_pod.sh delete   NAME ZONE
#
# The workdir should be a gs:// path (Orbax writes checkpoints there from every host); re-running
# `run` with the same arguments resumes after a preemption.
set -euo pipefail
cmd=${1:?command}; name=${2:?name}; zone=${3:?zone}; shift 3
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }
case "$cmd" in
  create)
    gcloud compute tpus tpu-vm create "$name" --zone "$zone" \
      --accelerator-type "${1:-v5litepod-16}" --version "${2:-v2-alpha-tpuv5-lite}" ;;
  copy)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$repo/.." -czf /tmp/agora_jax.tgz "$(basename "$repo")" shared/data
    gcloud compute tpus tpu-vm scp /tmp/agora_jax.tgz "$name":~ --zone "$zone" --worker=all
    ssh_all "tar -xzf ~/agora_jax.tgz" ;;
  install)
    ssh_all "cd ~/$(basename "$(cd "$(dirname "$0")/.." && pwd)") && pip install -q -e . 'jax[tpu]'" ;;
  run)
    ssh_all "cd ~/$(basename "$(cd "$(dirname "$0")/.." && pwd)") && python launch/main.py --multihost $*" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
