#!/usr/bin/env bash
# Gathers, on the development machine, what tools/gpu/{build,test,bench}.sh need on the GPU machine (which
# has no network and no Bazel) into .gpu/ (git-ignored; pass it as `carry`):
#   .gpu/debs  Debian's abseil, GoogleTest, gRPC, protobuf, spdlog, fmt, nlohmann-json,
#              prometheus-cpp packages (and zlib1g-dev: gRPC's and prometheus-cpp's -lz)
#   .gpu/whl   the Liger-Kernel and Cut Cross-Entropy wheels for the side-by-side benchmark, and
#              nvidia-cutlass (tools/requirements-cutlass.txt) for the CUTLASS headers
#   .gpu/gen   the C++ code protoc generates for lmhead.v1 and grpc.health.v1
#   .gpu/olmo  ai2-olmo-core (tools/requirements.txt) and the packages its nn.lm_head import needs
#              there (tools/gpu/requirements-parity.txt), for the parity step against olmo_core
#   .gpu/client  the grpcio wheels and the Python client's generated stubs, for the Python figure
#              of the serving benchmark (bench/python_load.py)
#   .gpu/build_lists.sh  each binary's sources, copts, nvcc command lines and linkopts, from
#              bazel cquery/aquery --config=cuda (tools/gpu/bazel_lists.py), and the commit they
#              were taken at (the benchmarks' tables record it): tools/gpu/ lists none itself.
#              After a BUILD change or a commit, `python3 tools/gpu/bazel_lists.py` alone brings
#              it up to date.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
rm -rf .gpu && mkdir -p .gpu/debs .gpu/whl .gpu/gen .gpu/olmo .gpu/client
(cd .gpu/debs && apt-get download -q libabsl-dev libabsl20220623 libgtest-dev libgmock-dev \
  libgrpc++-dev libgrpc++1.51 libgrpc-dev libgrpc29 libprotobuf-dev libprotobuf32 \
  libre2-9 libre2-dev libc-ares2 libc-ares-dev libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 \
  nlohmann-json3-dev prometheus-cpp-dev libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 \
  libprometheus-cpp-push1.0 libcivetweb1 zlib1g-dev 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl liger-kernel==0.6.4 cut-cross-entropy==25.1.1
python3 -m pip download -q --no-deps -d .gpu/whl -r tools/requirements-cutlass.txt
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/olmo "$(grep '^ai2-olmo-core==' tools/requirements.txt)" \
  -r tools/gpu/requirements-parity.txt
bazel build //proto:lmhead_cc_grpc //proto:health_cc_grpc
mkdir -p .gpu/gen/proto/lmhead/v1 .gpu/gen/grpc/health/v1
cp bazel-bin/proto/lmhead/v1/lmhead.{pb,grpc.pb}.{h,cc} .gpu/gen/proto/lmhead/v1/
cp bazel-bin/proto/health/grpc/health/v1/health.{pb,grpc.pb}.{h,cc} .gpu/gen/grpc/health/v1/
chmod -R u+w .gpu/gen
python3 tools/gpu/bazel_lists.py
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/client "$(grep -E '^grpcio==' tools/requirements-grpc.txt)" \
  "$(grep -E '^grpcio-health-checking==' tools/requirements-grpc.txt)"
PYTHON="$(tools/venv.sh path)/bin/python" client/python/generate_stubs.sh > /dev/null
cp -r client/python/lmhead_client/_proto .gpu/client/_proto
du -sh .gpu/*
