#!/usr/bin/env bash
# The main job: builds lmhead (installing what is missing) and runs the demo head.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
tools/setup.sh >/dev/null
bazel run //core:demo
