#!/usr/bin/env bash
# Builds lmhead's binaries on the GPU machine, which has no Bazel: each from the sources, flags
# and libraries Bazel gives it under --config=cuda (.gpu/build_lists.sh, tools/gpu/common.sh).
# From the repository root, with .gpu/ carried along:
#
#   tools/gpu/build.sh [NAME...]     # default: every binary .gpu/build_lists.sh names
#
# The binaries go to /tmp/lmhead-build/NAME; nvcc's ptxas reports to $OUT/ptxas_*.txt.
# tools/gpu/test.sh and bench.sh build what their steps need themselves.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
names=("$@")
((${#names[@]})) || names=("${!sources[@]}")
echo "== build ${names[*]} ($card; lists from Bazel at $build_lists_from)"
build "${names[@]}"
grep -hE "registers|spill" "$out"/ptxas_*.txt | cut -c1-160 | sort | uniq -c | head -12 || true
