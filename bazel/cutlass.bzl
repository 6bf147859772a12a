"""Finds the CUTLASS/CuTe headers inside the project's venv (the PyPI nvidia-cutlass package,
tools/requirements-cutlass.txt) and exposes them to Bazel as @cutlass//:headers."""

load("//bazel:venv.bzl", "venv_package_dir")

def _cutlass_impl(rctx):
    package = venv_package_dir(rctx, Label("@//tools:requirements-cutlass.txt"), "cutlass_library")
    rctx.symlink(package + "/source/include", "include")
    rctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])

filegroup(
    name = "headers",
    srcs = glob(["include/cute/**", "include/cutlass/**"]),
)
""")

cutlass_repository = repository_rule(
    implementation = _cutlass_impl,
    local = True,
)
