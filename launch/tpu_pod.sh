#!/usr/bin/env bash
# Runs one reco_jax experiment on every worker of a Cloud TPU VM (pod slice).
#
# Usage:
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [extra main.py flags...]
# e.g.
#   TFDS_DATA_DIR=gs://my-bucket/tfds launch/tpu_pod.sh my-tpu us-central2-b \
#     configs/voc.py:labels=200 gs://my-bucket/runs/voc200
#
# Environment:
#   TFDS_DATA_DIR  gs:// directory holding the prepared datasets (required).
#   REPO_URL       git URL to clone on the workers (REPO_REF: branch or commit, default main);
#                  without it this checkout (minus .git and virtual environments) is packed
#                  and copied to every worker.
#   PROJECT        gcloud project (default: the gcloud default).
# The workers install requirements.txt with jax[tpu] and run reco_jax.main --distributed;
# running the same command again resumes from the latest checkpoint in WORKDIR.
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
if [[ $# -lt 4 ]]; then
  echo "usage: $0 [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [main.py flags...]" >&2
  exit 2
fi
name="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4
if [[ -z "${TFDS_DATA_DIR:-}" ]]; then
  echo "Set TFDS_DATA_DIR to the gs:// directory of the prepared datasets." >&2
  exit 2
fi
if [[ "$workdir" != gs://* ]]; then
  echo "WORKDIR must be a gs:// path that every worker can write, got: $workdir" >&2
  exit 2
fi

# Single-quotes a word for the remote shell.
quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

jax_version="$(sed -n 's/^jax\[cpu\]==//p' "$(dirname "$0")/../requirements.txt")"
extra=""
for arg in "$@"; do extra+=" $(quote "$arg")"; done
remote='$HOME/reco_jax'
archive="/tmp/reco_jax_$$.tar.gz"
if [[ -n "${REPO_URL:-}" ]]; then
  ref="$(quote "${REPO_REF:-main}")"
  fetch="if [ ! -d $remote/.git ]; then git clone -q $(quote "$REPO_URL") $remote; fi; \
git -C $remote fetch -q origin $ref; git -C $remote checkout -q FETCH_HEAD"
else
  fetch="mkdir -p $remote && tar -xzf \$HOME/reco_jax.tar.gz -C $remote"
fi
bootstrap="set -e; $fetch; cd $remote; \
python3 -m pip install -q -r requirements.txt 'jax[tpu]==${jax_version}'; \
export TFDS_DATA_DIR=$(quote "$TFDS_DATA_DIR"); \
python3 -m reco_jax.main --distributed --config=$(quote "$config") \
--workdir=$(quote "$workdir")$extra"

project=()
if [[ -n "${PROJECT:-}" ]]; then project=(--project "$PROJECT"); fi
pack_cmd=(tar -czf "$archive" --exclude=.git --exclude=.venv --exclude=venv
          --exclude=__pycache__ -C "$(cd "$(dirname "$0")/.." && pwd)" .)
copy_cmd=(gcloud compute tpus tpu-vm scp "$archive" "$name:reco_jax.tar.gz"
          --zone "$zone" --worker=all "${project[@]}")
run_cmd=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all "${project[@]}"
         --command "$bootstrap")

show() {
  local out=""
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+-]+$ ]]; then out+="$word "; else out+="$(quote "$word") "; fi
  done
  echo "${out% }"
}

if [[ $dry_run -eq 1 ]]; then
  if [[ -z "${REPO_URL:-}" ]]; then show "${pack_cmd[@]}"; show "${copy_cmd[@]}"; fi
  show "${run_cmd[@]}"
  exit 0
fi
if [[ -z "${REPO_URL:-}" ]]; then
  "${pack_cmd[@]}"
  "${copy_cmd[@]}"
  rm -f "$archive"
fi
"${run_cmd[@]}"
