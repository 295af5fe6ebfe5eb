#!/usr/bin/env bash
# Times bn_cuda CPU ops in two builds side by side: BASE (a git revision, built CPU-only in a
# scratch worktree) and this checkout's in-place build (`python setup.py build_ext --inplace`).
# Each case runs bench/op_time.py in both, alternating, ROUNDS times; the table gives the best of
# each and new/base. The VM's noise moves separate runs by more than the few percent a kernel
# change is worth; the best of alternating runs does not.
#
#   scripts/compare_builds.sh BASE "32x2048x7x7 nchw bfloat16 eval 1" ["SHAPE FORMAT DTYPE PASS THREADS" ...]
#
# PYTHON (default .venv/bin/python) must have torch; ROUNDS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
ROUNDS=${ROUNDS:-3}
base_rev=$1
shift
here=$(pwd)
base_dir=$(mktemp -d)
trap 'git worktree remove --force "$base_dir" >/dev/null 2>&1 || rm -rf "$base_dir"' EXIT
git worktree add -q --detach "$base_dir" "$base_rev"
(cd "$base_dir" && BN_CUDA_FORCE_CPU=1 "$here/$PYTHON" setup.py -q build_ext --inplace >/dev/null 2>&1)
base_commit=$(git rev-parse --short "$base_rev")
new_commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- csrc bn_cuda || echo "+changes")

echo "| case (shape format dtype pass threads) | base $base_commit us | new $new_commit us | new/base |"
echo "|---|---:|---:|---:|"
for case in "$@"; do
  read -r shape format dtype pass threads <<<"$case"
  args=("$here/bench/op_time.py" "$shape" "$format" "$dtype" "$pass" --threads "${threads:-1}")
  best_base="" best_new=""
  for _ in $(seq "$ROUNDS"); do
    b=$(PYTHONPATH="$base_dir" "$here/$PYTHON" "${args[@]}")
    n=$(PYTHONPATH="$here" "$here/$PYTHON" "${args[@]}")
    if [[ -z $best_base || $b -lt $best_base ]]; then best_base=$b; fi
    if [[ -z $best_new || $n -lt $best_new ]]; then best_new=$n; fi
  done
  ratio=$(awk -v n="$best_new" -v b="$best_base" 'BEGIN { printf "%.2f", n / b }')
  echo "| $case | $best_base | $best_new | $ratio |"
done
