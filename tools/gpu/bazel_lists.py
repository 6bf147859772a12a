#!/usr/bin/env python3
"""Writes .gpu/build_lists.sh: what tools/gpu/build.sh compiles and links, taken from Bazel.

The GPU machine has no Bazel, so build.sh builds with g++ and nvcc itself; this script (run by
tools/gpu/fetch_deps.sh on the development machine, or alone after a BUILD file changed, once
.gpu/gen is there) asks Bazel, under --config=cuda, for
  sources[NAME]    each binary's .cc/.cu files of this repository (bazel cquery 'deps(TARGET)'),
                   the generated protobuf/gRPC code as its copies under .gpu/gen;
  copts[SRC]       the -D flags (defines, local_defines) and copts of the rule that compiles SRC;
  nvcc_args[SRC]   the nvcc command line of each .cu (bazel aquery, bazel/cuda.bzl's genrule),
                   less `-c SRC -o OUT`; `external/cutlass` is the GPU machine's unpacked wheel;
  linkopts[NAME]   the linkopts of every cc rule the binary depends on: this repository's, then
                   the external libraries' (@system_libs: Debian's, by -l name; @libtorch and
                   @cuda_toolkit with their directories as that machine's $torch/lib and
                   $cuda/lib64, see EXTERNAL_LIBS).
Compile flags for the libraries' headers stay build.sh's (its include directories).
"""
import json
import os
import shlex
import subprocess
import sys

# NAME (as tools/gpu/build.sh calls it) -> Bazel target.
TARGETS = {
    "gpu_lm_head_test": "//tests/gpu:gpu_lm_head_test",
    "lm_head_scoring_test": "//core:lm_head_scoring_test",
    "gpu_lm_head_bench": "//bench:gpu_lm_head_bench",
    "parity_runner": "//tests/parity:parity_runner",
    "lmhead_server": "//server:lmhead_server",
    "lmhead": "//client:lmhead",
    "gpu_server_oom_test": "//tests/gpu:gpu_server_oom_test",
    "gpu_shared_memory_test": "//tests/gpu:gpu_shared_memory_test",
    "lmhead_load": "//bench:lmhead_load",
    "lmhead_executor_bench": "//bench:lmhead_executor_bench",
}
# External repositories the nvcc command lines may name, as paths on the GPU machine (build.sh's
# $deps: the nvidia-cutlass wheel unpacked there).
EXTERNAL = {"cutlass": "$deps/cutlass/cutlass_library/source"}
# External repositories whose libraries a binary may link, with the directory their linkopts'
# absolute paths become there (None: they may name none; -l names resolve in build.sh's -L).
EXTERNAL_LIBS = {"system_libs": None, "libtorch": "$torch/lib", "cuda_toolkit": "$cuda/lib64"}
COMPILED = (".cc", ".cu")


def fail(message):
    sys.exit(f"bazel_lists.py: {message}")


def bazel(*args):
    result = subprocess.run(["bazel", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if result.returncode != 0:
        fail(f"bazel {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


def path_of(label):  # //core/ops:logit_stats.cc -> core/ops/logit_stats.cc
    package, _, name = label[2:].partition(":")
    return f"{package}/{name}" if package else name


def gen_copy(label):
    """A generated source's copy under .gpu/gen (fetch_deps.sh copies them there)."""
    path = path_of(label)
    copies = [os.path.join(d, f)[len(".gpu/gen/"):] for d, _, fs in os.walk(".gpu/gen") for f in fs]
    found = [c for c in copies if ("/" + path).endswith("/" + c)]
    if len(found) != 1:
        fail(f"{label} is generated, but .gpu/gen has {len(found)} copies of it "
             f"({found}): copy it there in tools/gpu/fetch_deps.sh")
    return ".gpu/gen/" + found[0]


def attr(rule, name):
    for a in rule["attribute"]:
        if a["name"] == name:
            return a.get("stringListValue", [])
    return []


def safe(flag, what):
    if not flag or any(c in flag for c in " \t\"'\\$`()"):
        fail(f"{what}: flag {flag!r} cannot be passed on as it is; teach bazel_lists.py about it")
    return flag


def external_flag(flag, repo, rule):
    """A linkopt of an external library with its absolute directory as the GPU machine's."""
    for prefix in ("-L", "-Wl,-rpath,"):
        if flag.startswith(prefix + "/"):
            if EXTERNAL_LIBS[repo] is None:
                fail(f"{rule}: linkopt {flag!r} names a directory; teach bazel_lists.py about it")
            return prefix + EXTERNAL_LIBS[repo]
    return safe(flag, rule)


def main():
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    sources, copts, linkopts = {}, {}, {}
    for name, target in TARGETS.items():
        external = []
        results = bazel("cquery", "--config=cuda", "--output=jsonproto", f"deps({target})")
        srcs = []
        generated = {r["target"]["generatedFile"]["name"] for r in results["results"]
                     if r["target"]["type"] == "GENERATED_FILE"}
        for result in results["results"]:
            t = result["target"]
            if t["type"] == "SOURCE_FILE":
                label = t["sourceFile"]["name"]
                if label.startswith("//") and label.endswith(COMPILED):
                    srcs.append(path_of(label))
            elif t["type"] == "GENERATED_FILE":
                label = t["generatedFile"]["name"]
                if label.startswith("//") and label.endswith(COMPILED):
                    srcs.append(gen_copy(label))
            elif t["type"] == "RULE" and t["rule"]["name"].startswith("@"):
                rule = t["rule"]
                repo = rule["name"][1:].partition("//")[0]
                if rule["ruleClass"] == "cc_library" and attr(rule, "linkopts"):
                    if repo not in EXTERNAL_LIBS:
                        fail(f"{target} links {rule['name']}, which build.sh cannot link: add "
                             "its repository to EXTERNAL_LIBS in tools/gpu/bazel_lists.py")
                    external.append((rule["name"], [external_flag(f, repo, rule["name"])
                                                    for f in attr(rule, "linkopts")]))
            elif t["type"] == "RULE" and t["rule"]["name"].startswith("//"):
                rule = t["rule"]
                if not rule["ruleClass"].startswith("cc_"):
                    continue
                # The generated code's include roots are .gpu/gen's layout (fetch_deps.sh).
                if attr(rule, "includes") and not set(attr(rule, "srcs")) <= generated:
                    fail(f"{rule['name']} has includes, which build.sh does not apply")
                flags = [safe(f, rule["name"]) for f in attr(rule, "copts")]
                flags += ["-D" + safe(d, rule["name"]) for d in
                          attr(rule, "defines") + attr(rule, "local_defines")]
                if attr(rule, "defines"):
                    fail(f"{rule['name']} has defines, which reach its dependents: build.sh gives "
                         "each source only its own rule's flags")
                for src in attr(rule, "srcs"):
                    if src.startswith("//") and src.endswith(".cc") and flags:
                        copts[path_of(src)] = " ".join(flags)
                opts = [safe(f, rule["name"]) for f in attr(rule, "linkopts")]
                linkopts.setdefault(name, []).extend(o for o in opts
                                                     if o not in linkopts.get(name, []))
        for _, opts in sorted(external):  # each library's flags once, as a group
            linkopts.setdefault(name, []).extend(opts)
        if not srcs:
            fail(f"no sources for {target}")
        sources[name] = sorted(set(srcs))

    # The nvcc command lines of bazel/cuda.bzl's genrules.
    union = " + ".join(f"deps({t})" for t in TARGETS.values())
    actions = bazel("aquery", "--config=cuda", "--output=jsonproto",
                    f'mnemonic("Genrule", {union})')
    nvcc_args = {}
    for action in actions.get("actions", []):
        script = action["arguments"][-1]
        for command in script.split(";"):
            words = shlex.split(command)
            if not words or not words[0].endswith("/nvcc"):
                continue
            args, src, i = [], None, 1
            while i < len(words):
                w = words[i]
                if w in ("-c", "-o"):
                    src = words[i + 1] if w == "-c" else src
                    i += 2
                    continue
                if w.startswith("-Ibazel-out/"):  # $(GENDIR): the generated files' root
                    w = "-I.gpu/gen"
                elif w.startswith("external/") or "external/" in w:
                    prefix, _, rest = w.partition("external/")
                    repo, _, tail = rest.partition("/")
                    if repo not in EXTERNAL:
                        fail(f"nvcc flag {w!r} names @{repo}, which build.sh does not have: add "
                             "it to EXTERNAL in tools/gpu/bazel_lists.py")
                    w = f"{prefix}{EXTERNAL[repo]}/{tail}"
                else:
                    safe(w, f"nvcc of {src}")
                args.append(w)
                i += 1
            if src is None:
                fail(f"an nvcc action without -c: {command}")
            nvcc_args[src] = " ".join(args)
    for name, srcs in sources.items():
        for src in srcs:
            if src.endswith(".cu") and src not in nvcc_args:
                fail(f"{src} ({name}) has no nvcc action in bazel aquery")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           stdout=subprocess.PIPE, text=True).stdout.strip()
    lines = [
        "# Generated by tools/gpu/bazel_lists.py (tools/gpu/fetch_deps.sh) from bazel cquery and",
        "# aquery --config=cuda; sourced by tools/gpu/common.sh. Do not edit: regenerate.",
        f"build_lists_from='{commit}{' with local changes' if dirty else ''}'",
        "declare -A sources=(",
        *(f"  [{n}]=\"{' '.join(s)}\"" for n, s in sources.items()),
        ")",
        "declare -A copts=(",
        *(f"  [{s}]=\"{f}\"" for s, f in sorted(copts.items())),
        ")",
        "declare -A nvcc_args=(",
        *(f"  [{s}]=\"{a}\"" for s, a in sorted(nvcc_args.items())),
        ")",
        "declare -A linkopts=(",
        *(f"  [{n}]=\"{' '.join(o)}\"" for n, o in sorted(linkopts.items()) if o),
        ")",
    ]
    with open(".gpu/build_lists.sh", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote .gpu/build_lists.sh: {sum(map(len, sources.values()))} sources of "
          f"{len(sources)} binaries, {len(nvcc_args)} nvcc command lines")


if __name__ == "__main__":
    main()
