#!/usr/bin/env bash
# Builds lmhead's CUDA path on the GPU machine (no Bazel, no network there) and runs the GPU
# tests, compute-sanitizer and the benchmarks. Run from the repository root on that machine:
#
#   tools/gpu/run.sh [test|bench|all|breakdown] [--quick]
#
# Needs, carried in .gpu/ (made on the development machine by tools/gpu/fetch_deps.sh):
# .gpu/debs/*.deb (Debian's abseil and GoogleTest, unpacked into a private prefix) and
# .gpu/whl/*.whl (Liger-Kernel and Cut Cross-Entropy, for the side-by-side benchmark).
# LibTorch comes from that machine's python3 (torch 2.11.0+cu130), CUDA from its nvcc.
# Logs and results go to $OUT (or /tmp/lmhead-out).
set -euo pipefail
what=${1:-all}
quick=${2:-}
out=${OUT:-/tmp/lmhead-out}
build=/tmp/lmhead-build
deps=/tmp/lmhead-deps
mkdir -p "$out" "$build" "$deps"

for deb in .gpu/debs/*.deb; do dpkg -x "$deb" "$deps"; done
torch=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
cuda=$(dirname "$(dirname "$(command -v nvcc)")")
libdir="$deps/usr/lib/x86_64-linux-gnu"
absl=$(PKG_CONFIG_LIBDIR="$libdir/pkgconfig" pkg-config --define-prefix --libs \
  absl_status absl_statusor absl_strings absl_str_format)

cxxflags=(-std=c++17 -O2 -fPIC -DLMHEAD_WITH_CUDA -I. -isystem "$deps/usr/include"
  -isystem "$torch/include" -isystem "$torch/include/torch/csrc/api/include"
  -isystem "$cuda/include")
ldflags=(-Wl,--disable-new-dtags -L"$torch/lib" -Wl,-rpath,"$torch/lib" -Wl,--no-as-needed -ltorch_cuda -lc10_cuda
  -ltorch_cpu -lc10 -Wl,--as-needed -L"$cuda/lib64" -Wl,-rpath,"$cuda/lib64" -lcudart
  -L"$libdir" -Wl,-rpath,"$libdir" $absl -lpthread)

echo "== build ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
sources=(core/config.cc core/torch_errors.cc core/layer_norm.cc core/losses.cc core/lm_head.cc
  core/ops/logit_stats.cc core/ops/cpu/logit_stats_cpu.cc)
pids=()
for src in "${sources[@]}"; do
  g++ "${cxxflags[@]}" -c "$src" -o "$build/$(basename "$src" .cc).o" & pids+=($!)
done
nvcc -std=c++17 -O3 -Xcompiler -fPIC -I. -gencode=arch=compute_90a,code=sm_90a \
  -gencode=arch=compute_90,code=compute_90 -Xptxas -v \
  -c core/ops/cuda/logit_stats_cuda.cu -o "$build/logit_stats_cuda.o" 2> "$out/ptxas.txt" & pids+=($!)
g++ "${cxxflags[@]}" -c tests/gpu/gpu_lm_head_test.cc -o "$build/gpu_lm_head_test.o" & pids+=($!)
g++ "${cxxflags[@]}" -c bench/gpu_lm_head_bench.cc -o "$build/gpu_lm_head_bench.o" & pids+=($!)
for pid in "${pids[@]}"; do wait "$pid"; done
objs=("$build"/{config,torch_errors,layer_norm,losses,lm_head,logit_stats,logit_stats_cpu,logit_stats_cuda}.o)
g++ -o "$build/gpu_lm_head_test" "$build/gpu_lm_head_test.o" "${objs[@]}" \
  "$libdir/libgtest.a" "$libdir/libgtest_main.a" "${ldflags[@]}"
g++ -o "$build/gpu_lm_head_bench" "$build/gpu_lm_head_bench.o" "${objs[@]}" "${ldflags[@]}"
grep -E "registers|spill" "$out/ptxas.txt" | head -6 || true

if [[ $what == test || $what == all ]]; then
  echo "== GPU tests"
  "$build/gpu_lm_head_test" > "$out/gpu_test.txt" 2>&1 && echo "gpu tests: passed" \
    || echo "gpu tests: FAILED"
  grep -E "^\[==========\]|^\[  PASSED  \]|^\[  FAILED  \]" "$out/gpu_test.txt" || true
  echo "== compute-sanitizer memcheck (small case)"
  compute-sanitizer --tool memcheck --error-exitcode 1 "$build/gpu_lm_head_test" \
    --gtest_filter='GpuLMHeadSmokeTest.*' > "$out/memcheck.txt" 2>&1 \
    && echo "memcheck: clean" || { echo "memcheck: errors"; tail -30 "$out/memcheck.txt"; }
fi
if [[ $what == breakdown ]]; then
  "$build/gpu_lm_head_bench" --breakdown | tee "$out/gpu_breakdown.txt"
fi
if [[ $what == bench || $what == all ]]; then
  echo "== benchmark: ours vs cuBLAS and eager"
  "$build/gpu_lm_head_bench" $quick | tee "$out/gpu_bench.txt"
  echo "== benchmark: Liger-Kernel and Cut Cross-Entropy"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lmhead-site .gpu/whl/*.whl
  PYTHONPATH=/tmp/lmhead-site python3 bench/gpu_baselines.py $quick | tee "$out/gpu_baselines.txt"
fi
