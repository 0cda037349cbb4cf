#!/usr/bin/env bash
# One node's share of a multi-node `r4b sft` / `r4b bpo`: torchrun with a c10d rendezvous. Run the same command on
# every node (scripts/slurm.sbatch does that under SLURM); torchrun gives each rank RANK, LOCAL_RANK, WORLD_SIZE and
# the process group's address, which r4b's engines read (LOCAL_RANK picks the GPU).
#
#   NNODES=4 MASTER_ADDR=node0 scripts/multinode.sh sft configs/recipes/r4b/sft.yaml [key=value ...]
#
# NNODES         nodes in the run (default 1)
# GPUS_PER_NODE  ranks on this node (default: the GPUs nvidia-smi lists, else 1)
# MASTER_ADDR    a host every node reaches; the rendezvous store runs there (default 127.0.0.1)
# MASTER_PORT    its port (default 29500)
# RUN_ID         the rendezvous id, the same on every node (default r4b)
# PYTHON         the Python that has r4b (default python)
# TORCHRUN_ARGS  more torchrun options, e.g. "--local-addr 10.0.0.5" where hostnames do not resolve
# R4B_DRY=1      print the command instead of running it
#
# output_dir must be on a filesystem every node sees: ranks write their checkpoint shards into one directory, and
# BPO's vLLM ranks read rank 0's rollout-init from it. A node that dies ends the run (--max-restarts 0); rerun the
# same command on every node and `train.resume: auto` continues from the newest intact checkpoint.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: scripts/multinode.sh sft|bpo CONFIG [key=value ...]" >&2
    exit 2
fi
stage=$1
config=$2
shift 2
gpus=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)}
[ "${gpus:-0}" -ge 1 ] 2>/dev/null || gpus=1
# shellcheck disable=SC2206  # TORCHRUN_ARGS is a list of options, split on purpose
command=(
    "${PYTHON:-python}" -m torch.distributed.run
    --nnodes "${NNODES:-1}" --nproc-per-node "$gpus"
    --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" --rdzv-id "${RUN_ID:-r4b}"
    --max-restarts 0 ${TORCHRUN_ARGS:-}
    -m r4b "$stage" --config "$config" "$@"
)
if [ "${R4B_DRY:-0}" = 1 ]; then
    echo "${command[*]}"
    exit 0
fi
exec "${command[@]}"
