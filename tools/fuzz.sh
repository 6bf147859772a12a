#!/usr/bin/env bash
# Builds every libFuzzer target (tests/fuzz; --config=fuzz: clang with ASan + UBSan) in a Bazel
# output base of its own, then for each target, one at a time: replays its saved crashes
# (tests/fuzz/regressions/<name>/) and fuzzes it for SECONDS_PER_TARGET seconds from a copy of its
# seed corpus (tests/fuzz/corpus/<name>/), so the repository is never written.
# Prints one line per target; exits non-zero if any target crashes, times out or runs out of
# memory (its input and log are then kept and their paths printed). Installs what is missing
# first (tools/setup.sh). docs/FUZZING.md has more.
#
#   tools/fuzz.sh [SECONDS_PER_TARGET]      default 60
#
# Environment:
#   LMHEAD_FUZZ_TARGETS      names to run (e.g. "npy safetensors"); default: every target
#   LMHEAD_FUZZ_OUTPUT_BASE  Bazel output base (default ~/.cache/lmhead/bazel-fuzz/<hash of this
#                            checkout's path>: one per checkout, as Bazel keys its own)
#   LMHEAD_FUZZ_KEEP         a folder to keep each target's grown corpus and log in (default: a
#                            temporary folder, removed when nothing failed)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

seconds=${1:-60}
if ! [[ $seconds =~ ^[0-9]+$ ]] || ((seconds < 1)); then
  echo "usage: tools/fuzz.sh [SECONDS_PER_TARGET]  (a whole number >= 1, got '$seconds')" >&2
  exit 2
fi
tools/setup.sh >/dev/null
output_base=${LMHEAD_FUZZ_OUTPUT_BASE:-$HOME/.cache/lmhead/bazel-fuzz/$(printf %s "$root" | md5sum | cut -c1-12)}
bazel_fuzz=(bazel "--output_base=$output_base")

"${bazel_fuzz[@]}" build --config=fuzz //tests/fuzz:all
bin=$("${bazel_fuzz[@]}" info --config=fuzz bazel-bin 2>/dev/null)
mapfile -t all_targets < <("${bazel_fuzz[@]}" query --output=label \
  'attr(tags, "\blmhead_fuzzer\b", //tests/fuzz:all)' 2>/dev/null | sed 's|.*:||; s|_fuzzer$||')
if ((${#all_targets[@]} == 0)); then
  echo "fuzz: bazel query found no target tagged lmhead_fuzzer in //tests/fuzz" >&2
  exit 1
fi
targets=(${LMHEAD_FUZZ_TARGETS:-${all_targets[*]}})

if [[ -n ${LMHEAD_FUZZ_KEEP:-} ]]; then
  work=$LMHEAD_FUZZ_KEEP
  mkdir -p "$work"
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/lmhead-fuzz.XXXXXX")
fi
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}

failed=0
for name in "${targets[@]}"; do
  fuzzer="$bin/tests/fuzz/${name}_fuzzer"
  if [[ ! -x $fuzzer ]]; then
    echo "fuzz: $name: no such target (have: ${all_targets[*]})" >&2
    failed=1
    continue
  fi
  corpus="$work/$name/corpus"
  log="$work/$name/log.txt"
  rm -rf "${corpus:?}"
  mkdir -p "$corpus"
  [[ -d tests/fuzz/corpus/$name ]] && cp tests/fuzz/corpus/"$name"/* "$corpus"/
  flags=(-timeout=10 -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$work/$name/")
  [[ -f tests/fuzz/$name.dict ]] && flags+=(-dict="tests/fuzz/$name.dict")

  # Saved crashes first: libFuzzer runs each file given as an argument once.
  regressions=()
  [[ -d tests/fuzz/regressions/$name ]] && mapfile -t regressions < <(find \
    tests/fuzz/regressions/"$name" -type f ! -name '*.md' | sort)
  if ((${#regressions[@]})) && ! "$fuzzer" "${flags[@]}" "${regressions[@]}" >"$log" 2>&1; then
    echo "fuzz: $name: FAILED replaying tests/fuzz/regressions/$name/ (log: $log)"
    failed=1
    continue
  fi

  start=$(date +%s)
  if "$fuzzer" "${flags[@]}" -max_total_time="$seconds" "$corpus" >>"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed=1
  fi
  elapsed=$(($(date +%s) - start))
  # The last status line ("#123 ... cov: 456 ft: 789 corp: 12/3Kb ...") and the final stats.
  last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  corp=$(sed -nE 's/.* corp: ([0-9]+)\/.*/\1/p' <<<"$last")
  runs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+)/\1/p' "$log" | tail -n 1)
  rate=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+)/\1/p' "$log" | tail -n 1)
  line="fuzz: $name: $status, ${elapsed} s, ${runs:-?} runs (${rate:-?}/s), cov ${cov:-?}, ft ${ft:-?}, corpus ${corp:-?}"
  if [[ $status != ok ]]; then
    inputs=$(find "$work/$name" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'timeout-*' \
      -o -name 'oom-*' -o -name 'leak-*' -o -name 'slow-unit-*' \) | paste -sd ' ')
    line+=", input: ${inputs:-none saved}, log: $log"
  fi
  echo "$line"
done

if ((failed)); then
  echo "fuzz: failures kept in $work; save a crash under tests/fuzz/regressions/<name>/" \
    "(docs/FUZZING.md)" >&2
  exit 1
fi
[[ -n ${LMHEAD_FUZZ_KEEP:-} ]] || rm -rf "$work"
