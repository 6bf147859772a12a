#!/usr/bin/env bash
# Builds the lmhead server image with podman, pulling nothing from a registry:
#
#   deploy/build_image.sh [cpu|cuda]      -> localhost/lmhead:cpu (default) or localhost/lmhead:cuda
#
# 1. The base: Debian 12 (minbase) with the runtime libraries the server and the CLI load from
#    Debian (gRPC, protobuf, abseil, spdlog, fmt, prometheus-cpp) and the unprivileged user
#    lmhead (uid and gid 10001), made by mmdebstrap from Debian's packages and `podman import`ed as
#    localhost/lmhead-base:<hash of this recipe>. It is made again only when the recipe changes.
# 2. //server:lmhead_server and //client:lmhead built by Bazel on this host (Debian 12 too, so
#    the same libraries and ABI as the base); `cuda` builds with --config=cuda (in an output base
#    of its own under the cache folder).
# 3. A build context: the two binaries in bin/, and in lib/ the LibTorch libraries they load from
#    the project's venv (cpu: exactly what `ldd` resolves there; cuda: all of torch/lib and the
#    wheel's nvidia-* libraries, some of which LibTorch opens only at run time).
# 4. `podman build --pull=never` of deploy/Dockerfile (the same file for both images) on the base.
#
# Installs what is missing first (tools/setup.sh: Bazel, the venv, podman, mmdebstrap).
# LMHEAD_IMAGE overrides the image name. Prints the image name last.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
device=${1:-cpu}
cache=${LMHEAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lmhead}
case "$device" in
  cpu) bazel=(bazel) bazel_config=() ;;
  # An output base of its own (as tools/fuzz.sh does), so the CUDA build never replaces the CPU
  # binaries in bazel-bin that the tests run; compiled actions still come from the disk cache.
  cuda)
    bazel=(bazel "--output_base=$cache/bazel-cuda-image" --max_idle_secs=60)
    bazel_config=(--config=cuda --symlink_prefix=/)
    ;;
  *) echo "usage: deploy/build_image.sh [cpu|cuda]" >&2; exit 2 ;;
esac
image=${LMHEAD_IMAGE:-localhost/lmhead:$device}
venv=$(tools/setup.sh | tail -n 1)
log() { echo "build_image: $*" >&2; }
tarball=""
context=""
trap 'rm -rf "$tarball" "$context"' EXIT

# --- 1. The base image, from Debian's packages.
# The shared libraries (and CA certificates) the binaries load from Debian; tests/container
# checks with ldd inside the image that nothing is missing.
runtime_packages=(
  ca-certificates libgrpc++1.51 libprotobuf32 libabsl20220623 libspdlog1.10 libfmt9 libgomp1
  libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0
)
mmdebstrap_args=(
  --variant=minbase --include="$(IFS=,; echo "${runtime_packages[*]}")"
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*'
  --customize-hook='chroot "$1" groupadd --gid 10001 lmhead'
  --customize-hook='chroot "$1" useradd --no-log-init --uid 10001 --gid 10001 --no-create-home \
    --home-dir /nonexistent --shell /usr/sbin/nologin lmhead'
  bookworm
)
base="localhost/lmhead-base:$(printf '%s\n' "${mmdebstrap_args[@]}" | sha256sum | cut -c1-16)"
if podman image exists "$base"; then
  log "reusing the base $base"
else
  log "making the base $base with mmdebstrap (downloads Debian packages)"
  tarball=$(mktemp --suffix=.tar)
  mmdebstrap --quiet "${mmdebstrap_args[@]}" "$tarball"
  podman import --quiet "$tarball" "$base" > /dev/null
  rm -f "$tarball"
  # Bases of earlier recipes, unless an image still builds on them.
  for stale in $(podman images --format '{{.Repository}}:{{.Tag}}' localhost/lmhead-base); do
    [[ $stale == "$base" ]] || podman rmi "$stale" > /dev/null 2>&1 || true
  done
fi

# --- 2. The binaries, built here.
"${bazel[@]}" build "${bazel_config[@]}" //server:lmhead_server //client:lmhead
bin=$("${bazel[@]}" info "${bazel_config[@]}" bazel-bin 2>/dev/null)

# --- 3. The build context.
context=$(mktemp -d)
mkdir -p "$context/bin" "$context/lib"
cp "$bin/server/lmhead_server" "$bin/client/lmhead" "$context/bin/"
chmod 0755 "$context/bin/"*
torch=$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
if [[ $device == cpu ]]; then
  # Every library ldd finds in the venv (LibTorch, c10, its libgomp, and the CUDA runtime and
  # CUPTI that the wheel's libtorch_cpu.so is linked against even for CPU work).
  libs=$(ldd "$context/bin/"* | awk -v venv="$venv/" 'index($3, venv) == 1 { print $3 }' | sort -u)
  [[ -n $libs ]] || { echo "build_image: ldd found no LibTorch library under $venv" >&2; exit 1; }
  for lib in $libs; do cp -L "$lib" "$context/lib/"; done
else
  find "$torch/lib" "$torch/../nvidia" -name 'lib*.so*' ! -name 'libtorch_python.so' \
    -exec cp -L {} "$context/lib/" \;
fi
log "context: $(du -sh "$context" | cut -f1) ($(ls "$context/lib" | wc -l) libraries)"

# --- 4. The image.
old=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
podman build --quiet --pull=never --build-arg "BASE=$base" -f deploy/Dockerfile -t "$image" \
  "$context" > /dev/null
new=$(podman image inspect --format '{{.Id}}' "$image")
# The image this one replaced, now untagged, unless a container still uses it.
if [[ -n $old && $old != "$new" ]]; then podman rmi "$old" > /dev/null 2>&1 || true; fi
log "built $image ($(podman image inspect --format '{{.Size}}' "$image" | numfmt --to=iec))"
echo "$image"
