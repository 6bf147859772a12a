#!/usr/bin/env bash
# Runs every test that needs no GPU: the Bazel unit and end-to-end tests, then the parity suite
# against the real olmo_core package. Installs what is missing first (tools/setup.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=$(tools/setup.sh | tail -n 1)

bazel test //...
# The CUDA sources and the GPU tests must keep compiling, although they only run on a GPU machine.
bazel build --config=cuda //core/... //tests/gpu:all //bench:gpu_lm_head_bench

if [[ -d tests/parity ]]; then
  bazel build //tests/parity:parity_runner
  LMHEAD_PARITY_RUNNER="$root/bazel-bin/tests/parity/parity_runner" \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/parity
fi
