# Sourced by tools/gpu/build.sh, test.sh and bench.sh on the GPU machine (no Bazel, no network
# there), from the repository root: where things go, the libraries unpacked from .gpu/, and
#   build NAME...   compiles (in parallel, each source once per run) and links the binaries
#                   $build/NAME from .gpu/build_lists.sh, which tools/gpu/bazel_lists.py writes
#                   from Bazel: each binary's sources, copts, nvcc lines and linkopts;
#   python_deps     the gRPC wheels and the client's generated stubs for the Python steps;
#   step CMD...     CMD bounded by $limit seconds; false when it failed or ran out of time.
# Needs .gpu/ (made on the development machine by tools/gpu/fetch_deps.sh; carried along).
# LibTorch comes from that machine's python3 (torch 2.11.0+cu130), CUDA from its nvcc.
set -euo pipefail
out=${OUT:-/tmp/lmhead-out}
build=/tmp/lmhead-build
deps=/tmp/lmhead-deps
mkdir -p "$out" "$build" "$deps"
limit=${LMHEAD_STEP_SECONDS:-420}  # each GPU program's bound: a hang costs one step, not the call

[[ -f .gpu/build_lists.sh ]] || { echo "!! no .gpu/build_lists.sh: run tools/gpu/fetch_deps.sh"; exit 1; }
if [[ ! -f $deps/.unpacked ]]; then
  for deb in .gpu/debs/*.deb; do dpkg -x "$deb" "$deps"; done
  python3 -m zipfile -e .gpu/whl/nvidia_cutlass-*.whl "$deps/cutlass"  # headers only
  touch "$deps/.unpacked"
fi
torch=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
cuda=$(dirname "$(dirname "$(command -v nvcc)")")
libdir="$deps/usr/lib/x86_64-linux-gnu"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)

# Every .cc with these, plus its rule's defines and copts (copts[SRC] of .gpu/build_lists.sh).
cxxflags=(-std=c++17 -O2 -fPIC -I. -I.gpu/gen -DSPDLOG_FMT_EXTERNAL -isystem "$deps/usr/include"
  -isystem "$torch/include" -isystem "$torch/include/torch/csrc/api/include"
  -isystem "$cuda/include")
# Where the -l names of Debian's libraries resolve (the linkopts name $torch and $cuda themselves).
ldflags=(-Wl,--disable-new-dtags -L"$libdir" -Wl,-rpath,"$libdir" -L"$build/lib" -lpthread)

# sources[NAME], copts[SRC], nvcc_args[SRC] (naming $deps), linkopts[NAME] (naming $torch, $cuda).
source .gpu/build_lists.sh

# A library that Bazel's flags name but whose unversioned .so only a -dev package has (libssl,
# libcrypto): linked against the machine's own versioned copy.
mkdir -p "$build/lib"
for name in ssl crypto; do
  if [[ ! -e $libdir/lib$name.so && ! -e $build/lib/lib$name.so ]]; then
    found=$(ls /usr/lib/x86_64-linux-gnu/lib$name.so.* /lib/x86_64-linux-gnu/lib$name.so.* \
      2>/dev/null | head -1 || true)
    [[ -n $found ]] && ln -s "$found" "$build/lib/lib$name.so"
  fi
done

ptxas_log() {  # where nvcc's ptxas -v report of a .cu goes
  echo "$out/ptxas_$(basename "$1" .cu).txt"
}
# Objects are reused while every source and header of the tree is as when they were compiled (a
# later test.sh or bench.sh on the same machine); any change recompiles what a binary needs.
tree=$(find core server client bench tests proto .gpu -type f \( -name '*.cc' -o -name '*.h' \
  -o -name '*.cu' -o -name '*.cuh' -o -name build_lists.sh \) -print0 | sort -z | xargs -0 sha1sum \
  | sha1sum | cut -c1-16)
if [[ $(cat "$build/obj/.tree" 2>/dev/null) != "$tree" ]]; then
  rm -rf "$build/obj" && mkdir -p "$build/obj" && echo "$tree" > "$build/obj/.tree"
fi
build() {  # build NAME...: compile the sources not compiled for this tree yet, then link each NAME
  local name src o pid pids=() failed=0 launched=" "
  for name; do
    for src in ${sources[$name]}; do
      o=$build/obj/$src.o
      [[ -f $o || $launched == *" $src "* ]] && continue
      launched+="$src "
      mkdir -p "$(dirname "$o")"
      if [[ $src == *.cu ]]; then
        nvcc ${nvcc_args[$src]} -Xptxas -v -c "$src" -o "$o.tmp" 2> "$(ptxas_log "$src")" \
          && mv "$o.tmp" "$o" & pids+=($!)
      else
        g++ "${cxxflags[@]}" ${copts[$src]:-} -c "$src" -o "$o.tmp" && mv "$o.tmp" "$o" & pids+=($!)
      fi
    done
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  ((failed == 0)) || { echo "!! compiling for $* failed"; return 1; }
  for name; do
    g++ -o "$build/$name" $(for src in ${sources[$name]}; do echo "$build/obj/$src.o"; done) \
      ${linkopts[$name]:-} "${ldflags[@]}" || { echo "!! linking $name failed"; return 1; }
  done
}

python_deps() {  # the gRPC wheels, protobuf, olmo_core's wheels and the client's stubs
  pydeps="$deps/py"
  if [[ ! -d $pydeps ]]; then
    python3 -m pip install -q --no-deps --upgrade --target "$pydeps" .gpu/client/grpcio*.whl \
      .gpu/olmo/*.whl .gpu/whl/liger_kernel-*.whl > /dev/null 2>&1 || true
  fi
  rm -rf client/python/lmhead_client/_proto && cp -r .gpu/client/_proto client/python/lmhead_client/
  export PYTHONPATH="$pydeps:$PWD/client/python"
}

step() { timeout "$limit" "$@"; }
