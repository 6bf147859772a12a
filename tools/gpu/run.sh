#!/usr/bin/env bash
# Builds lmhead's CUDA path on the GPU machine (no Bazel, no network there) and runs the GPU
# tests, compute-sanitizer and the benchmarks. Run from the repository root on that machine:
#
#   tools/gpu/run.sh [test|bench|all|breakdown|chunks|paths|sustained|variants|server|parity|oom|
#                     serving|executor|e2e|shm|scoring] [--quick]
#
# Several steps may be given as one word list, e.g. "test server"; `all` is "test bench". test
# also runs core/lm_head_scoring_test.cc's exact cases on cuda:0; scoring: issue 14's scoring
# outputs timed against the loss alone (gpu_lm_head_bench --scoring), and
# tests/e2e_python/test_scoring.py through a server on cuda:0.
# parity: the parity suite (tests/parity) with our head on cuda:0 against olmo_core on the same
# GPU (its PyTorch path and its Liger path; wheels from .gpu/olmo and .gpu/whl). oom: the real
# server run out of device memory (tests/gpu/gpu_server_oom_test.cc). serving: issue 12's serving
# benchmark (64 clients x 256 tokens against the real server: batching off and on, one GPU and,
# where there are two, both; the kernel-only tokens/s of the same shape measured first).
# executor: the same load without gRPC (bench/executor_bench.cc): jobs straight to the scheduler.
# shm: CUDA shared memory through the real server (tests/gpu/gpu_shared_memory_test.cc, and the
# Python client's CUDA IPC: tests/gpu/test_python_cuda_ipc.py).
# e2e: issue 13's end-to-end benchmark (bench/e2e_bench.py): one 32,768-token job through the
# Python client and the CLI with 1, 4 and 8 streams, the Python client through system shared memory
# and CUDA IPC, and through bench/reference_server.py.
# Needs .gpu/ (made on the development machine by tools/gpu/fetch_deps.sh; pass it as `carry`):
# Debian packages unpacked into a private prefix, the baseline wheels, generated protobuf code,
# and .gpu/build_lists.sh: each binary's sources, the nvcc command lines and the linkopts, from
# Bazel (tools/gpu/bazel_lists.py), so that this script lists no source or flag of the BUILD files.
# LibTorch comes from that machine's python3 (torch 2.11.0+cu130), CUDA from its nvcc.
# Logs and results go to $OUT (or /tmp/lmhead-out). LMHEAD_STEP_SECONDS (default 420) bounds each
# GPU program's run.
set -euo pipefail
what=${1:-all}
quick=${2:-}
out=${OUT:-/tmp/lmhead-out}
build=/tmp/lmhead-build
deps=/tmp/lmhead-deps
mkdir -p "$out" "$build" "$deps"
exec > >(tee "$out/run.txt") 2>&1  # everything printed is also kept in $OUT/run.txt
# Each GPU program gets at most this long, so that a hang costs one step, not the whole call.
limit=${LMHEAD_STEP_SECONDS:-420}
step() { timeout "$limit" "$@" || echo "!! $1 ${2:-} failed or ran past ${limit} s (exit $?)"; }
wants() { [[ " $what " == *" $1 "* || ($what == all && ($1 == test || $1 == bench)) ]]; }

[[ -f .gpu/build_lists.sh ]] || { echo "!! no .gpu/build_lists.sh: run tools/gpu/fetch_deps.sh"; exit 1; }
for deb in .gpu/debs/*.deb; do dpkg -x "$deb" "$deps"; done
python3 -m zipfile -e .gpu/whl/nvidia_cutlass-*.whl "$deps/cutlass"  # headers only
torch=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
cuda=$(dirname "$(dirname "$(command -v nvcc)")")
libdir="$deps/usr/lib/x86_64-linux-gnu"
absl=$(PKG_CONFIG_LIBDIR="$libdir/pkgconfig" pkg-config --define-prefix --libs \
  absl_status absl_statusor absl_strings absl_str_format)

# Every .cc with these, plus its rule's defines and copts (copts[SRC] of .gpu/build_lists.sh).
cxxflags=(-std=c++17 -O2 -fPIC -I. -I.gpu/gen -DSPDLOG_FMT_EXTERNAL -isystem "$deps/usr/include"
  -isystem "$torch/include" -isystem "$torch/include/torch/csrc/api/include"
  -isystem "$cuda/include")
ldflags=(-Wl,--disable-new-dtags -L"$torch/lib" -Wl,-rpath,"$torch/lib" -Wl,--no-as-needed -ltorch_cuda -lc10_cuda
  -ltorch_cpu -lc10 -Wl,--as-needed -L"$cuda/lib64" -Wl,-rpath,"$cuda/lib64" -lcudart
  -L"$libdir" -Wl,-rpath,"$libdir" $absl -lpthread)

# From Bazel (tools/gpu/bazel_lists.py): sources[NAME], copts[SRC], nvcc_args[SRC] (it names
# $deps), linkopts[NAME].
source .gpu/build_lists.sh
ptxas_log() {  # where nvcc's ptxas -v report of a .cu goes
  case $(basename "$1" .cu) in
    logit_stats_cuda) echo "$out/ptxas.txt" ;;
    fused_logit_stats_cuda) echo "$out/ptxas_fused.txt" ;;
    *) echo "$out/ptxas_$(basename "$1" .cu).txt" ;;
  esac
}
compiled=" "
compile() {  # compile NAME...: the binaries' sources not compiled yet in this run, in the background
  local name src o
  for name; do
    for src in ${sources[$name]}; do
      [[ $compiled == *" $src "* ]] && continue
      compiled+="$src "
      o=$build/obj/$src.o
      mkdir -p "$(dirname "$o")"
      if [[ $src == *.cu ]]; then
        nvcc ${nvcc_args[$src]} -Xptxas -v -c "$src" -o "$o" 2> "$(ptxas_log "$src")" & pids+=($!)
      else
        g++ "${cxxflags[@]}" ${copts[$src]:-} -c "$src" -o "$o" & pids+=($!)
      fi
    done
  done
}
objects() { local src; for src in ${sources[$1]}; do echo "$build/obj/$src.o"; done; }
link() {  # link NAME LIBS...: $build/NAME from its objects, LIBS and its rules' linkopts
  local name=$1; shift
  g++ -o "$build/$name" $(objects "$name") "$@" ${linkopts[$name]:-}
}

echo "== build ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); lists from Bazel at $build_lists_from)"
pids=()
compile gpu_lm_head_test lm_head_scoring_test gpu_lm_head_bench
for pid in "${pids[@]}"; do wait "$pid"; done
link gpu_lm_head_test "$libdir/libgtest.a" "$libdir/libgtest_main.a" "${ldflags[@]}"
link lm_head_scoring_test "$libdir/libgmock.a" "$libdir/libgtest.a" "$libdir/libgtest_main.a" \
  "${ldflags[@]}"
link gpu_lm_head_bench "${ldflags[@]}"
grep -E "registers|spill" "$out/ptxas.txt" | head -6 || true
grep -E "registers|spill|C7510" "$out/ptxas_fused.txt" | cut -c1-160 | head -8 || true

if wants test; then
  echo "== GPU tests"
  timeout "$limit" "$build/gpu_lm_head_test" > "$out/gpu_test.txt" 2>&1 && echo "gpu tests: passed" \
    || echo "gpu tests: FAILED"
  grep -E "^\[==========\]|^\[  PASSED  \]|^\[  FAILED  \]" "$out/gpu_test.txt" || true
  echo "== scoring outputs on cuda:0 (core/lm_head_scoring_test.cc, dyadic data: exact results)"
  LMHEAD_TEST_DEVICE=cuda:0 timeout "$limit" "$build/lm_head_scoring_test" \
    --gtest_filter='LMHeadScoringTest.BothImplementations*:LMHeadScoringTest.ScoresWithoutLabels:LMHeadScoringTest.SegmentCount*:LMHeadScoringTest.NoKeptPositions:LMHeadScoringTest.ForwardBatchEqualsForwardPerItem:LMHeadScoringTest.NaNHiddenStatesGiveNaNScores' \
    > "$out/gpu_scoring_test.txt" 2>&1 && echo "gpu scoring tests: passed" || echo "gpu scoring tests: FAILED"
  grep -E "^\[==========\]|^\[  PASSED  \]|^\[  FAILED  \]|Failure" "$out/gpu_scoring_test.txt" | head -20 || true
  echo "== compute-sanitizer memcheck (small case)"
  timeout "$limit" compute-sanitizer --tool memcheck --error-exitcode 1 "$build/gpu_lm_head_test" \
    --gtest_filter='GpuLMHeadSmokeTest.*' > "$out/memcheck.txt" 2>&1 \
    && echo "memcheck: clean" || { echo "memcheck: errors"; tail -30 "$out/memcheck.txt"; }
  echo "== compute-sanitizer memcheck and racecheck of the scoring kernels (small cases)"
  for tool in memcheck racecheck; do
    LMHEAD_TEST_DEVICE=cuda:0 timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      "$build/lm_head_scoring_test" \
      --gtest_filter='LMHeadScoringTest.ScoresWithoutLabels:LMHeadScoringTest.SegmentCount*' \
      > "$out/scoring_$tool.txt" 2>&1 && echo "scoring $tool: clean" \
      || { echo "scoring $tool: errors"; tail -30 "$out/scoring_$tool.txt"; }
  done
fi
if wants parity; then
  echo "== parity against olmo_core on the same GPU (tests/parity, LMHEAD_PARITY_DEVICE=cuda:0)"
  build_parity_runner() {
    local flags pids=() pid
    flags=$(PKG_CONFIG_LIBDIR="$libdir/pkgconfig" pkg-config --define-prefix --libs \
      absl_flags absl_flags_parse) || return 1
    compile parity_runner
    for pid in "${pids[@]}"; do wait "$pid" || return 1; done
    link parity_runner "${ldflags[@]}" $flags
  }
  if build_parity_runner && python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target /tmp/lmhead-parity-site .gpu/olmo/*.whl .gpu/whl/liger_kernel-*.whl; then
    PYTHONPATH=/tmp/lmhead-parity-site LMHEAD_PARITY_DEVICE=cuda:0 PYTHONUNBUFFERED=1 \
      LMHEAD_PARITY_RUNNER="$build/parity_runner" timeout "$limit" python3 -m pytest -q -s \
      -p no:cacheprovider tests/parity > "$out/gpu_parity.txt" 2>&1 \
      && echo "gpu parity: passed" || echo "gpu parity: FAILED (or ran past ${limit} s)"
    grep -E "^gpu parity vs olmo_core|^references:" "$out/gpu_parity.txt" || tail -40 "$out/gpu_parity.txt"
    echo "$(grep -c "^fp64 rule " "$out/gpu_parity.txt") values passed by the fp64 rule;" \
      "first failures:"
    grep -A4 "^FAIL " "$out/gpu_parity.txt" | cut -c1-300 | head -60 || true
  else
    echo "!! parity: the runner did not build or the wheels did not install"
  fi
fi
if wants server || wants oom || wants serving || wants executor || wants e2e || wants shm ||
  wants scoring; then
  echo "== build the server and the CLI"
  # grpc.pc names openssl, whose -dev package is not there; libgrpc links it itself.
  [[ -f $libdir/pkgconfig/openssl.pc ]] || printf 'Name: openssl\nDescription: system\nVersion: 3\nLibs:\nCflags:\n' \
    > "$libdir/pkgconfig/openssl.pc"
  grpc_flags=$(PKG_CONFIG_LIBDIR="$libdir/pkgconfig" pkg-config --define-prefix --cflags --libs \
    grpc++ grpc protobuf spdlog fmt absl_flags absl_flags_parse absl_flags_usage \
    prometheus-cpp-pull prometheus-cpp-core)
  pids=()
  compile lmhead_server lmhead
  wants oom && compile gpu_server_oom_test
  wants shm && compile gpu_shared_memory_test
  wants serving && compile lmhead_load
  wants executor && compile lmhead_executor_bench
  for pid in "${pids[@]}"; do wait "$pid"; done
  link lmhead_server "${ldflags[@]}" $grpc_flags -lgrpc++_reflection
  link lmhead -L"$libdir" -Wl,--disable-new-dtags -Wl,-rpath,"$libdir" $grpc_flags
fi
if wants executor; then
  echo "== executor-only: 64 clients x 256-token jobs straight to the scheduler (no gRPC), d=4096,"
  echo "   V=128256, bf16, fused_linear, sum; packing off (1) and on (8192) (issue 12)"
  link lmhead_executor_bench "${ldflags[@]}" $grpc_flags -lgrpc++_reflection
  step "$build/lmhead_executor_bench" --device cuda:0 | tee "$out/executor.txt"
  echo "-- again, counting and timing the executor's ATen operators (slower: a callback per operator)"
  step "$build/lmhead_executor_bench" --device cuda:0 --seconds 5 --count_ops | tee -a "$out/executor.txt"
  if (($(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l) >= 2)); then
    step "$build/lmhead_executor_bench" --device cuda:0,cuda:1 | tee -a "$out/executor.txt"
  fi
fi
if wants e2e; then
  echo "== e2e: one 32,768-token job, d=4096, V=128256, bf16, fused_linear, sum (issue 13)"
  step "$build/gpu_lm_head_bench" --serving | tee "$out/e2e_kernel.txt"
  kernel=$(grep "N=8192 " "$out/e2e_kernel.txt" | sed -E 's/.* ([0-9]+) tokens\/s/\1/')
  pydeps="$deps/py"
  python3 -m pip install -q --no-deps --upgrade --target "$pydeps" .gpu/client/grpcio*.whl \
    .gpu/olmo/*.whl .gpu/whl/liger_kernel-*.whl > /dev/null 2>&1 || true
  rm -rf client/python/lmhead_client/_proto && cp -r .gpu/client/_proto client/python/lmhead_client/
  # The client processes as docs/API.md advises ("Throughput of big calls"); the servers restart
  # with the same themselves (--malloc_huge_pages), the reference server inherits it.
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 PYTHONPATH="$pydeps:client/python" step python3 \
    bench/e2e_bench.py --device cuda:0 --streams 1,4,8 --kernel_tokens_per_s "$kernel" \
    --lmhead "$build/lmhead_server" --cli "$build/lmhead" | tee "$out/e2e.txt"
  echo "-- where one 8192-token unary call's time goes (bench/transport_breakdown.py), by HTTP/2 setting"
  for run in "0 --malloc_huge_pages=false" "0 " "1 "; do
    read -r client flags <<< "$run"
    echo "server flags: ${flags:-(none)}; client huge pages: $client"
    GLIBC_TUNABLES=glibc.malloc.hugetlb=$client PYTHONPATH="$pydeps:client/python" step python3 \
      bench/transport_breakdown.py --device cuda:0 --lmhead "$build/lmhead_server" --tokens 8192 \
      --vocab_size 128256 --repeat 7 --server_flags="$flags" | tee -a "$out/breakdown.txt"
  done
fi
if wants serving; then
  echo "== serving: 64 clients x 256-token calls, d=4096, V=128256, bf16, fused_linear, sum (issue 12)"
  link lmhead_load -L"$libdir" -Wl,--disable-new-dtags -Wl,-rpath,"$libdir" $grpc_flags
  step "$build/gpu_lm_head_bench" --serving | tee "$out/serving_kernel.txt"
  kernel=$(grep "N=8192 " "$out/serving_kernel.txt" | sed -E 's/.* ([0-9]+) tokens\/s/\1/')
  gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
  work=$(mktemp -d)
  serve() {  # serve NAME FLAGS...: the big demo head in bf16, on a free port
    local name=$1; shift
    "$build/lmhead_server" --host 127.0.0.1 --port 0 --port_file "$work/$name" \
      --demo_d_model 4096 --demo_vocab_size 128256 --demo_dtype bfloat16 --log_level warn "$@" \
      > "$out/serving_$name.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 600); do [[ -s $work/$name ]] && break; sleep 0.2; done
  }
  load() {  # load NAME LABEL: the C++ load generator against server NAME
    step "$build/lmhead_load" --address "127.0.0.1:$(cat "$work/$1")" --clients 64 --channels 8 \
      --tokens 256 --d_model 4096 --vocab_size 128256 --seconds 20 --warmup_seconds 5 \
      --label "$2" | tee -a "$out/serving.txt"
  }
  runs=("off --device cuda:0 --max_batch_tokens 1" "on --device cuda:0 --max_batch_tokens 8192")
  ((gpus >= 2)) && runs+=("two --device cuda:0,cuda:1")
  for run in "${runs[@]}"; do
    read -r name flags <<< "$run"
    serve "$name" $flags
    load "$name" "$name: ${flags}"
    if [[ $name == on ]]; then  # the Python client beside it, on the same server
      # One caller, one call at a time: what the transport adds to a 256-token call (issue 13's
      # latency goal: p50 less the server's batch compute).
      step "$build/lmhead_load" --address "127.0.0.1:$(cat "$work/on")" --clients 1 --channels 1 \
        --tokens 256 --d_model 4096 --vocab_size 128256 --seconds 10 --warmup_seconds 2 \
        --label "one caller: --device cuda:0" | tee -a "$out/serving.txt"
      pydeps="$deps/py"
      python3 -m pip install -q --no-deps --upgrade --target "$pydeps" .gpu/client/grpcio*.whl \
        .gpu/olmo/protobuf-*.whl > /dev/null 2>&1 || true
      rm -rf client/python/lmhead_client/_proto && cp -r .gpu/client/_proto client/python/lmhead_client/
      PYTHONPATH="$pydeps:client/python" step python3 bench/python_load.py \
        --address "127.0.0.1:$(cat "$work/on")" --processes 8 --threads 8 --seconds 20 \
        --warmup_seconds 5 --label "on: --device cuda:0" | tee -a "$out/serving.txt"
    fi
    kill -TERM "$server_pid" 2>/dev/null; wait "$server_pid" || true
  done
  echo "kernel-only tokens/s (8192-token batches, measured above): $kernel"
  python3 - "$out/serving.txt" "$kernel" <<'PY'
import re, sys
kernel = float(sys.argv[2])
for line in open(sys.argv[1]):
    m = re.search(r"(load [^:]*): .* ([0-9]+) tokens/s", line) or re.search(r"^(python load[^:]*:[^:]*): .* ([0-9]+) tokens/s", line)
    if m:
        print(f"{m.group(1)}: {float(m.group(2)) / kernel:.1%} of kernel-only")
PY
fi
if wants oom; then
  echo "== out of device memory through the server (tests/gpu/gpu_server_oom_test.cc)"
  link gpu_server_oom_test "$libdir/libgtest.a" "$libdir/libgtest_main.a" "${ldflags[@]}" \
    $grpc_flags
  LMHEAD_SERVER="$build/lmhead_server" timeout "$limit" "$build/gpu_server_oom_test" \
    > "$out/gpu_oom.txt" 2>&1 && echo "gpu server oom test: passed" || echo "gpu server oom test: FAILED"
  grep -vE "^\[ *(RUN|OK) *\]|^\[-+\]|^$" "$out/gpu_oom.txt" | cut -c1-400 | head -60 || true
fi
if wants shm; then
  echo "== CUDA shared memory through the server (tests/gpu/gpu_shared_memory_test.cc)"
  link gpu_shared_memory_test "$libdir/libgtest.a" "$libdir/libgtest_main.a" "${ldflags[@]}" \
    $grpc_flags
  LMHEAD_SERVER="$build/lmhead_server" timeout "$limit" "$build/gpu_shared_memory_test" \
    > "$out/gpu_shm.txt" 2>&1 && echo "gpu shared memory test: passed" \
    || echo "gpu shared memory test: FAILED"
  grep -vE "^\[ *(RUN|OK) *\]|^\[-+\]|^$" "$out/gpu_shm.txt" | cut -c1-400 | head -60 || true
  echo "== the Python client's CUDA IPC, device-memory gauges and models loaded at run time through the server (tests/gpu/test_python_cuda_ipc.py, test_device_metrics.py)"
  pydeps="$deps/py"
  python3 -m pip install -q --no-deps --upgrade --target "$pydeps" .gpu/client/grpcio*.whl \
    .gpu/olmo/protobuf-*.whl > /dev/null 2>&1 || true
  rm -rf client/python/lmhead_client/_proto && cp -r .gpu/client/_proto client/python/lmhead_client/
  LMHEAD_SERVER="$build/lmhead_server" PYTHONPATH="$pydeps:client/python" timeout "$limit" \
    python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_python_cuda_ipc.py \
    tests/gpu/test_device_metrics.py \
    > "$out/gpu_python_ipc.txt" 2>&1 && echo "python cuda ipc test: passed" \
    || echo "python cuda ipc test: FAILED"
  tail -40 "$out/gpu_python_ipc.txt" | cut -c1-400
fi
if wants scoring; then
  echo "== scoring outputs against the loss alone (gpu_lm_head_bench --scoring, issue 14)"
  step "$build/gpu_lm_head_bench" --scoring | tee "$out/scoring.txt"
  echo "== the scoring tests through gRPC, the server on cuda:0 (tests/e2e_python/test_scoring.py)"
  pydeps="$deps/py"
  python3 -m pip install -q --no-deps --upgrade --target "$pydeps" .gpu/client/grpcio*.whl \
    .gpu/olmo/*.whl > /dev/null 2>&1 || true
  rm -rf client/python/lmhead_client/_proto && cp -r .gpu/client/_proto client/python/lmhead_client/
  # The tests' servers, each on cuda:0 (the last --device given wins). Not the test that a
  # streamed job gives one call's bits: on the CPU a row's softmax sums the same way whatever the
  # batch; CUDA's reductions (and GEMMs) pick their order by shape, so the bits differ there.
  printf '#!/bin/sh\nexec %s "$@" --device cuda:0\n' "$build/lmhead_server" > "$build/server_on_gpu"
  chmod +x "$build/server_on_gpu"
  LMHEAD_SERVER="$build/server_on_gpu" PYTHONPATH="$pydeps:client/python" timeout "$limit" \
    python3 -m pytest -q -p no:cacheprovider tests/e2e_python/test_scoring.py \
    -k "not test_score_stream_equals_one_call" \
    > "$out/gpu_python_scoring.txt" 2>&1 && echo "python scoring tests on cuda:0: passed" \
    || echo "python scoring tests on cuda:0: FAILED"
  tail -15 "$out/gpu_python_scoring.txt" | cut -c1-400
fi
if wants server; then
  echo "== the same demo head served from the CPU and from cuda:0"
  work=$(mktemp -d)
  "$build/lmhead_server" --host 127.0.0.1 --port 0 --port_file "$work/cpu" --device cpu \
    > "$out/server_cpu.log" 2>&1 &
  "$build/lmhead_server" --host 127.0.0.1 --port 0 --port_file "$work/gpu" --device cuda:0 \
    > "$out/server_gpu.log" 2>&1 &
  "$build/lmhead_server" --host 127.0.0.1 --port 0 --port_file "$work/big" --device cuda:0 \
    --demo_d_model 4096 --demo_vocab_size 128256 > "$out/server_big.log" 2>&1 &
  "$build/lmhead_server" --host 127.0.0.1 --port 0 --port_file "$work/big_one_at_a_time" \
    --device cuda:0 --demo_d_model 4096 --demo_vocab_size 128256 --stream_read_ahead=false \
    > "$out/server_big_one_at_a_time.log" 2>&1 &
  servers=($(jobs -p))
  for _ in $(seq 300); do
    [[ -s $work/cpu && -s $work/gpu && -s $work/big && -s $work/big_one_at_a_time ]] && break
    sleep 0.2
  done
  python3 - "$work" <<'PY'
import sys, numpy as np
rng = np.random.default_rng(0)
w = sys.argv[1]
np.save(f"{w}/x.npy", rng.standard_normal((3, 7, 64), dtype=np.float32))
y = rng.integers(0, 1000, size=(3, 7)); y[0, :2] = -100
np.save(f"{w}/y.npy", y)
np.save(f"{w}/xs.npy", rng.standard_normal((48, 256, 64), dtype=np.float32))  # 3 MiB: 3 micro-batches
ys = rng.integers(0, 1000, size=(48, 256)); ys[5, :7] = -100
np.save(f"{w}/ys.npy", ys)
np.save(f"{w}/xbig.npy", rng.standard_normal((16, 2048, 4096), dtype=np.float32))
np.save(f"{w}/ybig.npy", rng.integers(0, 128256, size=(16, 2048)))
PY
  for impl in default fused_linear; do
    for dev in cpu gpu; do
      "$build/lmhead" forward --address "127.0.0.1:$(cat "$work/$dev")" --hidden "$work/x.npy" \
        --labels "$work/y.npy" --z_loss_multiplier 1e-3 --loss_reduction none \
        --loss_implementation $impl --output "$work/$dev-$impl.safetensors"
      "$build/lmhead" forward --address "127.0.0.1:$(cat "$work/$dev")" --hidden "$work/xs.npy" \
        --labels "$work/ys.npy" --loss_reduction none --micro_batch_mib 1 --return_logits false \
        --loss_implementation $impl --output "$work/$dev-$impl-stream.safetensors" > /dev/null
    done
  done
  python3 - "$work" <<'PY'
import sys, torch
from safetensors.torch import load_file
w = sys.argv[1]
for impl in ("default", "fused_linear", "default-stream", "fused_linear-stream"):
    c, g = load_file(f"{w}/cpu-{impl}.safetensors"), load_file(f"{w}/gpu-{impl}.safetensors")
    assert c.keys() == g.keys(), (c.keys(), g.keys())
    for k in sorted(c):
        torch.testing.assert_close(g[k], c[k], rtol=1e-4, atol=1e-5)
    print(f"cuda:0 server == cpu server for {impl}: {sorted(c)} {[tuple(c[k].shape) for k in sorted(c)]}")
PY
  echo "== 16 x 2048 tokens, d=4096, V=128256, bf16 compute, fused_linear, streamed in 64 MiB"
  echo "   (servers alternating: reading ahead, the default, and --stream_read_ahead=false)"
  for i in 1 2 3 4; do
    for server in big big_one_at_a_time; do
      start=$(date +%s.%N)
      "$build/lmhead" forward --address "127.0.0.1:$(cat "$work/$server")" --hidden "$work/xbig.npy" \
        --labels "$work/ybig.npy" --dtype bf16 --loss_implementation fused_linear \
        --loss_reduction sum --return_logits false --output "$work/$server.safetensors" \
        > /dev/null 2> "$work/cli.err"
      echo "run $i, $server: $(python3 -c "print(f'{$(date +%s.%N) - $start:.2f}')") s wall for 32768 tokens (512 MiB of fp32 hidden states)"
    done
  done
  python3 - "$work" <<'PY'
import sys, torch
from safetensors.torch import load_file
w = sys.argv[1]
a, b = load_file(f"{w}/big.safetensors"), load_file(f"{w}/big_one_at_a_time.safetensors")
for k in sorted(a):
    torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=0)
print(f"reading ahead == one at a time (rtol 1e-6): {sorted(a)}")
PY
  grep -h "micro-batch" "$out/server_big.log" | tail -3 || true
  grep -h "ForwardStream" "$out/server_gpu.log" | tail -4 || true
  kill -TERM "${servers[@]}" 2>/dev/null; wait "${servers[@]}" || true
fi
if wants breakdown; then
  step "$build/gpu_lm_head_bench" --breakdown | tee "$out/gpu_breakdown.txt"
fi
if wants paths; then  # the fused GEMM and the chunked path against one GEMM
  step "$build/gpu_lm_head_bench" --paths | tee "$out/gpu_paths.txt"
fi
if wants sustained; then  # each path back to back, with the SM clock and power under load
  step "$build/gpu_lm_head_bench" --sustained | tee "$out/gpu_sustained.txt"
fi
if wants variants; then  # fused GEMM schedules (LMHEAD_FUSED_SCHEDULE; "e": an empty epilogue)
  pids=()
  fused=core/ops/cuda/fused_logit_stats_cuda.cu
  for variant in ${LMHEAD_FUSED_VARIANTS:-1 0 1e 0e}; do
    defines=(-DLMHEAD_FUSED_SCHEDULE="${variant%e}")
    [[ $variant == *e ]] && defines+=(-DLMHEAD_FUSED_EMPTY_EPILOGUE)
    nvcc ${nvcc_args[$fused]} -Xptxas -v "${defines[@]}" -c "$fused" \
      -o "$build/fused_$variant.o" 2> "$out/ptxas_fused_$variant.txt" & pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done  # a bare `wait` would wait for tee too
  for variant in ${LMHEAD_FUSED_VARIANTS:-1 0 1e 0e}; do
    variant_objs=($(objects gpu_lm_head_bench))
    variant_objs=("${variant_objs[@]/"$build/obj/$fused.o"/"$build/fused_$variant.o"}")
    g++ -o "$build/bench_$variant" "${variant_objs[@]}" "${ldflags[@]}"
    echo "variant $variant: $(grep -E "spill" "$out/ptxas_fused_$variant.txt" | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
    step "$build/bench_$variant" --paths --quick | grep paths || true
  done
fi
if wants chunks; then  # ours at several chunk budgets, interleaved with one GEMM
  step "$build/gpu_lm_head_bench" --tile_sweep | tee "$out/gpu_chunks.txt"
fi
if wants bench; then
  echo "== benchmark: ours vs cuBLAS and eager"
  # The card's clocks, power and temperature once a second, for reading the timings.
  nvidia-smi dmon -s pc -d 1 > "$out/gpu_clocks.txt" 2>&1 & dmon=$!
  step "$build/gpu_lm_head_bench" $quick | tee "$out/gpu_bench.txt"
  echo "== benchmark: Liger-Kernel and Cut Cross-Entropy"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lmhead-site .gpu/whl/*.whl
  step env PYTHONPATH=/tmp/lmhead-site python3 bench/gpu_baselines.py $quick | tee "$out/gpu_baselines.txt"
  kill "$dmon" 2>/dev/null || true
  echo "SM clock MHz during the benchmarks (min/median/max): $(awk '$1 !~ /#/ && NF > 5 {print $NF}' \
    "$out/gpu_clocks.txt" | sort -n | awk '{a[NR]=$1} END {if (NR) print a[1] "/" a[int((NR+1)/2)] "/" a[NR]}')"
fi
