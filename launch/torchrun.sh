#!/usr/bin/env bash
# Run any hybrid-megatron subcommand on one node with torchrun.
# Usage: launch/torchrun.sh NPROC SUBCOMMAND CONFIG [args...]
#   e.g. launch/torchrun.sh 2 check configs/tiny.yaml --set parallel.tensor=2 --set model.mamba.num_groups=2
set -euo pipefail
nproc=${1:?usage: launch/torchrun.sh NPROC SUBCOMMAND CONFIG [args...]}
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc_per_node "$nproc" -m hybrid_megatron.cli "$@"
