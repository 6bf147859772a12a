#!/usr/bin/env bash
# Installs what building and testing lmhead needs, skipping whatever is already there:
# Debian's packages (Bazel 4.2.3, gRPC, protobuf, abseil, spdlog, GoogleTest, Google Benchmark,
# nlohmann-json, prometheus-cpp, clang with libFuzzer, podman and mmdebstrap) and the project's
# Python venv (LibTorch, olmo_core; see tools/venv.sh).
# Idempotent; safe to run on every build. Prints the venv path last.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

packages=(
  bazel-bootstrap bazel-platforms bazel-rules-java pkg-config
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev grpc-proto
  libabsl-dev libspdlog-dev libfmt-dev libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev python3-venv clang-format prometheus-cpp-dev
  # The fuzz targets (tools/fuzz.sh): clang, and compiler-rt's libFuzzer and sanitizer runtimes.
  clang libclang-rt-14-dev
  # The container image (deploy/build_image.sh, tests/container): podman with Debian's runc,
  # and mmdebstrap for its base.
  podman runc mmdebstrap
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "lmhead: installing Debian packages: ${missing[*]}" >&2
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
fi

"$root/tools/venv.sh" ensure
