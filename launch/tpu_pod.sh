#!/usr/bin/env bash
# Runs the same training command on every host of a TPU pod slice.
#
#   launch/tpu_pod.sh NAME ZONE configs/grpo_dora.py gs://BUCKET/runs/dora [--config.x=y ...]
#
# Each host runs launch/train.py with --multihost, which calls jax.distributed.initialize() (TPU VMs
# find the coordinator themselves); every host then reads its own shard of the prompts (grain sharding
# by jax.process_index()) and the mesh spans all chips of the slice. The workdir must be shared storage
# (a GCS bucket or NFS) so that checkpoints and the resolved config are seen by every host.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [extra flags]" >&2
  exit 2
fi
name=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=${REPO_DIR:-\$HOME/jaxrl-peft}
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e
  cd $repo
  . .venv/bin/activate
  python launch/train.py --config=$config --workdir=$workdir --multihost $*
"
