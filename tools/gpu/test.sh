#!/usr/bin/env bash
# Runs lmhead's GPU tests on the GPU machine (one command; it builds what they need first).
# From the repository root, with .gpu/ carried along (tools/gpu/fetch_deps.sh makes it):
#
#   tools/gpu/test.sh [STEP...]      # default: all of them, in this order
#
#   unit       tests/gpu/gpu_lm_head_test.cc, and core/lm_head_scoring_test.cc's exact cases on
#              cuda:0 (LMHEAD_TEST_DEVICE)
#   sanitizer  compute-sanitizer memcheck of the kernel test's small cases, memcheck and racecheck
#              of the scoring kernels'
#   parity     tests/parity with our head on cuda:0 against olmo_core on the same GPU (its
#              PyTorch path and its Liger path)
#   oom        tests/gpu/gpu_server_oom_test.cc: the real server run out of device memory
#   shm        tests/gpu/gpu_shared_memory_test.cc (CUDA shared memory through the server),
#              tests/gpu/test_python_cuda_ipc.py and test_device_metrics.py
#   scoring    tests/e2e_python/test_scoring.py against a server on cuda:0
#   server     tests/gpu/test_gpu_server_matches_cpu.py: cuda:0 answers as the CPU does
#
# Each program is bounded by LMHEAD_STEP_SECONDS (default 420). Logs go to $OUT (or
# /tmp/lmhead-out), everything printed also to $OUT/test.txt. Exit status 1 when any step failed.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exec > >(tee -a "$out/test.txt") 2>&1
all=(unit sanitizer parity oom shm scoring server)
steps=("$@")
((${#steps[@]})) || steps=("${all[@]}")
failed=()
check() {  # check NAME LOG CMD...: run CMD into LOG, print a summary line, remember a failure
  local name=$1 log=$2; shift 2
  if step "$@" > "$log" 2>&1; then echo "$name: passed"; else echo "$name: FAILED"; failed+=("$name"); fi
}
gtest_summary() { grep -E "^\[==========\]|^\[  PASSED  \]|^\[  FAILED  \]|Failure" "$1" | head -20 || true; }
pytest_summary() { tail -"${2:-8}" "$1" | cut -c1-400; }

echo "== GPU tests on $card ($gpus GPU(s)): ${steps[*]}"
for s in "${steps[@]}"; do
  case $s in
    unit)
      build gpu_lm_head_test lm_head_scoring_test
      check "gpu kernel tests" "$out/gpu_test.txt" "$build/gpu_lm_head_test"
      gtest_summary "$out/gpu_test.txt"
      LMHEAD_TEST_DEVICE=cuda:0 check "scoring tests on cuda:0" "$out/gpu_scoring_test.txt" \
        "$build/lm_head_scoring_test" --gtest_filter='LMHeadScoringTest.BothImplementations*:LMHeadScoringTest.ScoresWithoutLabels:LMHeadScoringTest.SegmentCount*:LMHeadScoringTest.NoKeptPositions:LMHeadScoringTest.ForwardBatchEqualsForwardPerItem:LMHeadScoringTest.NaNHiddenStatesGiveNaNScores'
      gtest_summary "$out/gpu_scoring_test.txt"
      ;;
    sanitizer)
      build gpu_lm_head_test lm_head_scoring_test
      check "memcheck, kernel test" "$out/memcheck.txt" compute-sanitizer --tool memcheck \
        --error-exitcode 1 "$build/gpu_lm_head_test" --gtest_filter='GpuLMHeadSmokeTest.*'
      for tool in memcheck racecheck; do
        LMHEAD_TEST_DEVICE=cuda:0 check "$tool, scoring kernels" "$out/scoring_$tool.txt" \
          compute-sanitizer --tool "$tool" --error-exitcode 1 "$build/lm_head_scoring_test" \
          --gtest_filter='LMHeadScoringTest.ScoresWithoutLabels:LMHeadScoringTest.SegmentCount*'
      done
      ;;
    parity)
      build parity_runner
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/lmhead-parity-site .gpu/olmo/*.whl .gpu/whl/liger_kernel-*.whl
      PYTHONPATH=/tmp/lmhead-parity-site LMHEAD_PARITY_DEVICE=cuda:0 PYTHONUNBUFFERED=1 \
        LMHEAD_PARITY_RUNNER="$build/parity_runner" check "parity against olmo_core on cuda:0" \
        "$out/gpu_parity.txt" python3 -m pytest -q -s -p no:cacheprovider tests/parity
      grep -E "^gpu parity vs olmo_core|^references:" "$out/gpu_parity.txt" || true
      grep -A4 "^FAIL " "$out/gpu_parity.txt" | cut -c1-300 | head -40 || true
      ;;
    oom)
      build lmhead_server gpu_server_oom_test
      LMHEAD_SERVER="$build/lmhead_server" check "server out of device memory" \
        "$out/gpu_oom.txt" "$build/gpu_server_oom_test"
      grep -vE "^\[ *(RUN|OK) *\]|^\[-+\]|^$" "$out/gpu_oom.txt" | cut -c1-400 | head -40 || true
      ;;
    shm)
      build lmhead_server gpu_shared_memory_test
      LMHEAD_SERVER="$build/lmhead_server" check "CUDA shared memory through the server" \
        "$out/gpu_shm.txt" "$build/gpu_shared_memory_test"
      gtest_summary "$out/gpu_shm.txt"
      python_deps
      LMHEAD_SERVER="$build/lmhead_server" check "Python CUDA IPC and device metrics" \
        "$out/gpu_python_ipc.txt" python3 -m pytest -q -s -p no:cacheprovider \
        tests/gpu/test_python_cuda_ipc.py tests/gpu/test_device_metrics.py
      pytest_summary "$out/gpu_python_ipc.txt"
      ;;
    scoring)
      build lmhead_server
      python_deps
      # The tests' servers on cuda:0 (the last --device given wins). Not the test that a streamed
      # job gives one call's bits: on the CPU a row's softmax sums the same way whatever the
      # batch; CUDA's reductions (and GEMMs) pick their order by shape, so the bits differ there.
      printf '#!/bin/sh\nexec %s "$@" --device cuda:0\n' "$build/lmhead_server" > "$build/server_on_gpu"
      chmod +x "$build/server_on_gpu"
      LMHEAD_SERVER="$build/server_on_gpu" check "Python scoring tests on cuda:0" \
        "$out/gpu_python_scoring.txt" python3 -m pytest -q -p no:cacheprovider \
        tests/e2e_python/test_scoring.py -k "not test_score_stream_equals_one_call"
      pytest_summary "$out/gpu_python_scoring.txt"
      ;;
    server)
      build lmhead_server
      python_deps
      LMHEAD_SERVER="$build/lmhead_server" check "the server on cuda:0 answers as on the CPU" \
        "$out/gpu_server.txt" python3 -m pytest -q -p no:cacheprovider \
        tests/gpu/test_gpu_server_matches_cpu.py
      pytest_summary "$out/gpu_server.txt"
      ;;
    *) echo "unknown step: $s (steps: ${all[*]})"; exit 2 ;;
  esac
done
if ((${#failed[@]})); then echo "== FAILED: ${failed[*]}"; exit 1; fi
echo "== all passed: ${steps[*]}"
