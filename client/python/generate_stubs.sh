#!/usr/bin/env bash
# Generates the Python gRPC stubs of proto/lmhead/v1/*.proto into lmhead_client/_proto/ (not
# committed), for using the package from this folder without installing it (the in-tree tests
# do). `pip install client/python` does not need it: the package build generates them itself.
# The work is generate_stubs.py's, shared with that build.
#
#   client/python/generate_stubs.sh            # uses python3 (needs grpcio-tools)
#   PYTHON=/path/to/venv/bin/python client/python/generate_stubs.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "${PYTHON:-python3}" "$here/generate_stubs.py"
