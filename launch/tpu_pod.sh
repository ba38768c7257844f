#!/usr/bin/env bash
# Runs the same training command on every host of a TPU pod slice.
#
#   launch/tpu_pod.sh NAME ZONE configs/grpo_dora.py gs://BUCKET/runs/dora [--config.x=y ...]
#
# Each host runs launch/train.py with --multihost, which calls jax.distributed.initialize() (TPU VMs
# find the coordinator themselves); every host then reads its own shard of the prompts (grain sharding
# by jax.process_index()) and the mesh spans all chips of the slice. The workdir must be shared storage
# that every host sees: a bucket (gs://BUCKET/..., written through etils.epath, which needs gcsfs on
# every host: pip install -e ".[tpu]") or an absolute path on NFS. Orbax coordinates the checkpoint
# writes of all hosts; the first host alone writes config.json, run.json, metrics.jsonl and TensorBoard.
# A resumed pod run (same command, same workdir) continues from the latest checkpoint in the bucket.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [extra flags]" >&2
  exit 2
fi
name=$1 zone=$2 config=$3 workdir=$4
shift 4
case "$workdir" in
  *://* | /*) ;;
  *) echo "WORKDIR=$workdir: expected shared storage (gs://BUCKET/runs/NAME or an absolute NFS path); a" \
          "relative path would give every host its own run" >&2
     exit 2 ;;
esac
repo=${REPO_DIR:-\$HOME/jaxrl-peft}
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e
  cd $repo
  . .venv/bin/activate
  python launch/train.py --config=$config --workdir=$workdir --multihost $*
"
