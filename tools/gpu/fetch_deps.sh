#!/usr/bin/env bash
# Downloads, on the development machine, what tools/gpu/run.sh needs on the GPU machine (which
# has no network) into .gpu/ (git-ignored; pass it as `carry`): Debian's abseil and GoogleTest
# packages, and the Liger-Kernel and Cut Cross-Entropy wheels for the side-by-side benchmark.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
mkdir -p .gpu/debs .gpu/whl
(cd .gpu/debs && apt-get download libabsl-dev libabsl20220623 libgtest-dev libgmock-dev)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl liger-kernel==0.6.4 cut-cross-entropy==25.1.1
ls -la .gpu/debs .gpu/whl
