"""The CUDA toolkit (nvcc, cudart, cuBLAS) from /usr/local/cuda or $CUDA_HOME, and cuda_library.

cuda_library compiles .cu files with nvcc into objects that a cc_library links. The targets are
built only under --config=cuda (//bazel:cuda); CUDA sources never include LibTorch headers.
"""

def _cuda_toolkit_impl(rctx):
    cuda_home = rctx.os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if not rctx.path(cuda_home + "/bin/nvcc").exists:
        rctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])
sh_binary(name = "nvcc", srcs = ["missing_nvcc.sh"])
cc_library(name = "cuda_runtime")
""")
        rctx.file("missing_nvcc.sh", "#!/bin/sh\necho 'nvcc not found under {}: set CUDA_HOME' >&2\nexit 1\n".format(cuda_home), executable = True)
        return
    # A wrapper, not a symlink: nvcc finds cicc and its other tools relative to its own path.
    rctx.file("nvcc", "#!/bin/sh\nexec {}/bin/nvcc \"$@\"\n".format(cuda_home), executable = True)
    rctx.symlink(cuda_home + "/include", "include")
    lib = cuda_home + "/lib64"
    rctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])
exports_files(["nvcc"])

cc_library(
    name = "cuda_runtime",
    hdrs = glob(["include/**/*.h", "include/**/*.hpp", "include/**/*.cuh", "include/**/*.inl"]),
    includes = ["include"],
    linkopts = ["-L{lib}", "-Wl,-rpath,{lib}", "-lcudart", "-lcublasLt", "-lcublas"],
)
""".format(lib = lib))

cuda_toolkit = repository_rule(
    implementation = _cuda_toolkit_impl,
    environ = ["CUDA_HOME"],
    local = True,
)

# Hopper's own instructions (sm_90a) plus PTX that later GPUs compile at load time.
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
]

def cuda_library(name, srcs, hdrs = [], deps = [], nvcc_flags = [], nvcc_headers = [], **kwargs):
    """Compiles srcs (.cu) with nvcc; the objects and hdrs form a cc_library.

    nvcc_headers: more headers the sources include (filegroups, e.g. @cutlass//:headers); their
    include paths go in nvcc_flags.
    """
    objects = []
    for src in srcs:
        obj = "_{}_objs/{}.o".format(name, src.rsplit(".", 1)[0])
        native.genrule(
            name = "{}_{}_nvcc".format(name, src.replace("/", "_").replace(".", "_")),
            srcs = [src] + hdrs + nvcc_headers,
            outs = [obj],
            tools = ["@cuda_toolkit//:nvcc"],
            cmd = " ".join([
                "$(location @cuda_toolkit//:nvcc)",
                "-std=c++17 -O3 -Xcompiler -fPIC --expt-relaxed-constexpr",
                "-I. -I$(GENDIR)",
                " ".join(CUDA_ARCH_FLAGS + nvcc_flags),
                "-c $(location {}) -o $@".format(src),
            ]),
            target_compatible_with = kwargs.get("target_compatible_with", []),
        )
        objects.append(obj)
    native.cc_library(
        name = name,
        srcs = objects,
        hdrs = hdrs,
        deps = deps + ["@cuda_toolkit//:cuda_runtime"],
        linkstatic = True,
        **kwargs
    )
