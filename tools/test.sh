#!/usr/bin/env bash
# Runs every test that needs no GPU. Installs what is missing first (tools/setup.sh).
#  0. Every C++/CUDA source is formatted as .clang-format says.
#  1. Bazel: unit tests, and the end-to-end tests of the real server and CLI over loopback; every
#     include of a repository header declared as a dependency in BUILD (tools/check_layering.py).
#  2. The CUDA sources and GPU tests must keep compiling (they run on the GPU machine only); the
#     CUDA build of the server is kept for step 4, which starts it (on the CPU).
#  3. The parity suite: our core against the real olmo_core package.
#  4. The Python client against the real server: the parity grid over gRPC, reflection, health,
#     streaming.
#  5. A one-minute soak of the real server under mixed load (tests/soak, docs/SOAK.md): every
#     answer and status checked, the server survives and exits 0.
#  6. Every fuzz target (clang, ASan + UBSan) for 60 s each, after replaying its saved crashes
#     (tools/fuzz.sh, docs/FUZZING.md).
#  7. The Kubernetes manifests (deploy/k8s): each overlay rendered by `kubectl kustomize`,
#     validated against the Kubernetes 1.32 schemas (strict), checked for what the pods depend
#     on, and the server started with the Deployment's command line (tests/deploy).
#  8. Packaging, from a clean copy of the checkout: `pip install client/python`, `pip wheel` and
#     the sdist's wheel into fresh venvs, and examples/cpp_client (a Bazel workspace of its own
#     using @lmhead//client:lmhead_client) built; each makes a real call to the server
#     (tests/packaging).
#  9. The CPU container image (deploy/build_image.sh: podman, a base made from Debian's packages)
#     built and run read-only as uid 10001: health, a forward through its CLI equal to the host
#     server's, metrics, TLS with tokens, a graceful stop; hadolint on deploy/Dockerfile
#     (tests/container).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=$(tools/setup.sh | tail -n 1)

git ls-files -z '*.cc' '*.h' '*.cu' ':!bazel/' | xargs -0 clang-format --dry-run --Werror

bazel test //...
python3 tools/check_layering.py
bazel build --config=cuda //core/... //tests/gpu:gpu_lm_head_test //tests/gpu:gpu_server_oom_test \
  //tests/gpu:gpu_shared_memory_test //server:lmhead_server //bench:gpu_lm_head_bench
cuda_server=$(mktemp -d)/lmhead_server_cuda
cp bazel-bin/server/lmhead_server "$cuda_server"

bazel build //tests/parity:parity_runner //server:lmhead_server
LMHEAD_PARITY_RUNNER="$root/bazel-bin/tests/parity/parity_runner" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/parity

PYTHON="$venv/bin/python" client/python/generate_stubs.sh
LMHEAD_SERVER="$root/bazel-bin/server/lmhead_server" LMHEAD_CUDA_SERVER="$cuda_server" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/e2e_python
rm -rf "$(dirname "$cuda_server")"

LMHEAD_SERVER="$root/bazel-bin/server/lmhead_server" "$venv/bin/python" tests/soak/soak.py --minutes 1

tools/fuzz.sh 60

LMHEAD_SERVER="$root/bazel-bin/server/lmhead_server" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/deploy

LMHEAD_SERVER="$root/bazel-bin/server/lmhead_server" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/packaging

LMHEAD_SERVER="$root/bazel-bin/server/lmhead_server" LMHEAD_CLI="$root/bazel-bin/client/lmhead" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/container
