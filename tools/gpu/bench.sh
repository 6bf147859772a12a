#!/usr/bin/env bash
# Runs lmhead's GPU benchmarks on the GPU machine (it builds what they need first). From the
# repository root, with .gpu/ carried along (tools/gpu/fetch_deps.sh makes it):
#
#   tools/gpu/bench.sh [STEP...] [--quick]    # default: forward
#
# Steps that write a table (bench/results/README.md) to $OUT/results/<card>/:
#   forward    fused_linear_forward.csv: gpu_lm_head_bench (ours, cuBLAS, eager) and
#              bench/gpu_baselines.py (Liger-Kernel, Cut Cross-Entropy); --quick: one shape
#   scoring    scoring.csv: the scoring outputs against the loss alone (gpu_lm_head_bench --scoring)
#   serving    serving.csv: lmhead_load (64 callers x 256 tokens) against lmhead_server, batching
#              off and on, on both GPUs where there are two, one caller alone, and
#              bench/python_load.py; each against the kernel-only rate measured first
#   executor   executor.csv: the same load straight to the scheduler (bench/executor_bench.cc)
#   e2e        transport.csv: one 32,768-token job through each transport (bench/e2e_bench.py),
#              then where one unary call's time goes (bench/transport_breakdown.py)
# Diagnostics, printed only: paths (fused GEMM vs the tiled path), sustained (each path at the
# power cap), breakdown (where the tiled path's time goes), tiles (tile budgets).
#
# Each program is bounded by LMHEAD_STEP_SECONDS (default 420). Everything printed also goes to
# $OUT/bench.txt (or /tmp/lmhead-out). Copy $OUT/results/<card>/*.csv into bench/results/<card>/
# to record a run. Exit status 1 when a benchmark failed.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exec > >(tee -a "$out/bench.txt") 2>&1
quick=()
steps=()
for arg; do [[ $arg == --quick ]] && quick=(--quick) || steps+=("$arg"); done
((${#steps[@]})) || steps=(forward)
slug=$(echo "$card" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
# The rows' card and commit (the commit .gpu/build_lists.sh was made at, "with local changes"
# when the tree differed from it).
export LMHEAD_RESULTS="$out/results/$slug" LMHEAD_CARD="$card" LMHEAD_COMMIT="$build_lists_from"
mkdir -p "$LMHEAD_RESULTS"
failed=()
run() { step "$@" || { echo "!! $1 failed or ran past ${limit} s"; failed+=("$(basename "$1")"); }; }
kernel_rate() {  # kernel-only tokens/s of 8192-token batches (gpu_lm_head_bench --serving)
  run "$build/gpu_lm_head_bench" --serving | tee "$out/kernel_only.txt" >&2
  grep "N=8192 " "$out/kernel_only.txt" | sed -E 's/.* ([0-9]+) tokens\/s/\1/'
}
serve() {  # serve NAME FLAGS...: the big demo head in bf16 on a free port; sets server_pid
  local name=$1; shift
  rm -f "$work/$name"
  "$build/lmhead_server" --host 127.0.0.1 --port 0 --port_file "$work/$name" \
    --demo_d_model 4096 --demo_vocab_size 128256 --demo_dtype bfloat16 --log_level warn "$@" \
    > "$out/serving_$name.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 600); do [[ -s $work/$name ]] && break; sleep 0.2; done
}
work=$(mktemp -d)

echo "== benchmarks on $card ($gpus GPU(s)), commit $LMHEAD_COMMIT: ${steps[*]} ${quick[*]}"
for s in "${steps[@]}"; do
  case $s in
    forward)
      build gpu_lm_head_bench
      nvidia-smi dmon -s pc -d 1 > "$out/gpu_clocks.txt" 2>&1 & dmon=$!
      run "$build/gpu_lm_head_bench" "${quick[@]}"
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lmhead-site \
        .gpu/whl/*.whl
      run env PYTHONPATH=/tmp/lmhead-site python3 bench/gpu_baselines.py "${quick[@]}"
      kill "$dmon" 2>/dev/null || true
      echo "SM clock MHz (min/median/max): $(awk '$1 !~ /#/ && NF > 5 {print $NF}' \
        "$out/gpu_clocks.txt" | sort -n | awk '{a[NR]=$1} END {if (NR) print a[1] "/" a[int((NR+1)/2)] "/" a[NR]}')"
      ;;
    scoring)
      build gpu_lm_head_bench
      run "$build/gpu_lm_head_bench" --scoring
      ;;
    serving)
      build gpu_lm_head_bench lmhead_server lmhead_load
      python_deps
      kernel=$(kernel_rate)
      runs=("batching off: --device cuda:0 --max_batch_tokens 1"
        "batching on (the default): --device cuda:0")
      ((gpus >= 2)) && runs+=("two GPUs: --device cuda:0,cuda:1")
      for r in "${runs[@]}"; do
        label=${r%%:*} flags=${r#*: }
        serve serving $flags
        address="127.0.0.1:$(cat "$work/serving")"
        run "$build/lmhead_load" --address "$address" --clients 64 --channels 8 --tokens 256 \
          --d_model 4096 --vocab_size 128256 --seconds 20 --warmup_seconds 5 \
          --kernel_tokens_per_s "$kernel" --label "$label"
        if [[ $label == "batching on"* ]]; then
          # One caller, one call at a time: what the transport adds to a 256-token call.
          run "$build/lmhead_load" --address "$address" --clients 1 --channels 1 --tokens 256 \
            --d_model 4096 --vocab_size 128256 --seconds 10 --warmup_seconds 2 \
            --kernel_tokens_per_s "$kernel" --label "one caller"
          run python3 bench/python_load.py --address "$address" --processes 8 --threads 8 \
            --seconds 20 --warmup_seconds 5 --kernel_tokens_per_s "$kernel" --label "$label"
        fi
        kill -TERM "$server_pid" 2>/dev/null; wait "$server_pid" || true
      done
      ;;
    executor)
      build lmhead_executor_bench
      run "$build/lmhead_executor_bench" --device cuda:0
      echo "-- again, counting and timing the executor's ATen operators (slower: a callback each)"
      LMHEAD_RESULTS= run "$build/lmhead_executor_bench" --device cuda:0 --seconds 5 --count_ops
      ((gpus < 2)) || run "$build/lmhead_executor_bench" --device cuda:0,cuda:1
      ;;
    e2e)
      build gpu_lm_head_bench lmhead_server lmhead
      python_deps
      kernel=$(LMHEAD_RESULTS= kernel_rate)  # e2e_bench.py writes it as transport.csv's baseline
      # The client processes as docs/API.md advises ("Throughput of big calls"); the servers
      # restart with the same themselves (--malloc_huge_pages), the reference server inherits it.
      GLIBC_TUNABLES=glibc.malloc.hugetlb=1 run python3 bench/e2e_bench.py --device cuda:0 \
        --streams 1,4,8 --kernel_tokens_per_s "$kernel" --lmhead "$build/lmhead_server" \
        --cli "$build/lmhead"
      echo "-- where one 8192-token unary call's time goes, by where huge pages are on"
      for r in "0 --malloc_huge_pages=false" "0 " "1 "; do
        read -r client flags <<< "$r"
        echo "server flags: ${flags:-(none)}; client huge pages: $client"
        GLIBC_TUNABLES=glibc.malloc.hugetlb=$client run python3 bench/transport_breakdown.py \
          --device cuda:0 --lmhead "$build/lmhead_server" --tokens 8192 --vocab_size 128256 \
          --repeat 7 --server_flags="$flags"
      done
      ;;
    paths) build gpu_lm_head_bench && run "$build/gpu_lm_head_bench" --paths "${quick[@]}" ;;
    sustained) build gpu_lm_head_bench && run "$build/gpu_lm_head_bench" --sustained ;;
    breakdown) build gpu_lm_head_bench && run "$build/gpu_lm_head_bench" --breakdown ;;
    tiles) build gpu_lm_head_bench && run "$build/gpu_lm_head_bench" --tile_sweep ;;
    *) echo "unknown step: $s (forward scoring serving executor e2e paths sustained breakdown tiles)"
      exit 2 ;;
  esac
done
echo "== tables written: $(cd "$LMHEAD_RESULTS" && ls *.csv 2>/dev/null | tr '\n' ' ')"
if ((${#failed[@]})); then echo "== FAILED: ${failed[*]}"; exit 1; fi
