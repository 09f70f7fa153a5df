#!/usr/bin/env bash
# Runs one reco_jax experiment on this machine (all its GPUs, or the CPU).
#
# Usage:
#   launch/local.sh CONFIG WORKDIR [extra main.py flags...]
# e.g.
#   launch/local.sh configs/toy.py /tmp/reco_toy
#   launch/local.sh configs/voc.py:labels=200,method=classmix runs/voc200 \
#     --config.data_dir=$HOME/tensorflow_datasets
# Running the same command again resumes from the latest checkpoint in WORKDIR.
# On GPUs the default JAX memory preallocation is kept; TensorFlow is kept off the GPUs.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [main.py flags...]" >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec python3 -m reco_jax.main --config="$config" --workdir="$workdir" "$@"
