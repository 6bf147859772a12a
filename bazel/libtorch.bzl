"""Finds LibTorch inside the project's venv (the PyPI torch wheel) and exposes it to Bazel.

The venv's location comes from tools/venv.sh (a per-user cache keyed by
tools/requirements.txt); tools/setup.sh creates it.
"""

load("//bazel:venv.bzl", "venv_package_dir")

def _libtorch_impl(rctx):
    torch_dir = venv_package_dir(rctx, Label("@//tools:requirements.txt"), "torch")
    # Every top-level include folder except google/: the wheel bundles protobuf headers of
    # another version, which would shadow Debian's (/usr/include) in any target that also
    # uses gRPC or protobuf.
    listing = rctx.execute(["ls", "-1", torch_dir + "/include"])
    if listing.return_code != 0:
        fail("cannot list {}/include: {}".format(torch_dir, listing.stderr))
    for entry in listing.stdout.strip().split("\n"):
        if entry and entry != "google":
            rctx.symlink(torch_dir + "/include/" + entry, "include/" + entry)
    rctx.symlink(torch_dir + "/lib", "lib")
    lib = torch_dir + "/lib"
    rctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "headers",
    hdrs = glob(["include/**/*.h", "include/**/*.hpp", "include/**/*.cuh"]),
    includes = ["include", "include/torch/csrc/api/include"],
)

# LibTorch for the CPU: libtorch_cpu and libc10.
cc_library(
    name = "torch_cpu",
    linkopts = ["-L{lib}", "-Wl,-rpath,{lib}", "-Wl,--push-state,--no-as-needed", "-ltorch_cpu", "-lc10", "-Wl,--pop-state"],
    deps = [":headers"],
)

# LibTorch with its CUDA backend (--config=cuda).
cc_library(
    name = "torch_cuda",
    linkopts = ["-L{lib}", "-Wl,-rpath,{lib}", "-Wl,--push-state,--no-as-needed", "-ltorch_cuda", "-lc10_cuda", "-ltorch_cpu", "-lc10", "-Wl,--pop-state"],
    deps = [":headers"],
)

exports_files(["lib"])
""".format(lib = lib))

libtorch_repository = repository_rule(
    implementation = _libtorch_impl,
    local = True,
)
