"""Turns Debian's system libraries into cc_library targets, offline.

Headers live in /usr/include (a built-in include directory of the toolchain), so the targets
carry only the compile and link flags that pkg-config prints for each package.
"""

# target name -> pkg-config packages
_PACKAGES = {
    "absl": ["absl_status", "absl_statusor", "absl_strings", "absl_str_format", "absl_synchronization", "absl_flags", "absl_flags_parse", "absl_flags_usage"],
    "benchmark": ["benchmark"],
    "fmt": ["fmt"],
    "grpc": ["grpc++", "grpc"],
    "nlohmann_json": ["nlohmann_json"],
    "gtest": ["gtest", "gmock"],
    "gtest_main": ["gtest", "gmock", "gtest_main"],
    "prometheus": ["prometheus-cpp-pull", "prometheus-cpp-core"],
    "protobuf": ["protobuf"],
    "spdlog": ["spdlog"],
}

# Libraries that have no pkg-config file of their own.
_EXTRA_LINKOPTS = {}

_EXTRA_DEFINES = {
    # Debian's spdlog is built against the system fmt.
    "spdlog": ["SPDLOG_FMT_EXTERNAL"],
}

def _pkg_config(rctx, flag, packages):
    res = rctx.execute(["pkg-config", flag] + packages)
    if res.return_code != 0:
        fail("pkg-config {} {} failed: {}\nRun tools/setup.sh to install the Debian packages.".format(
            flag,
            " ".join(packages),
            res.stderr,
        ))
    return [f for f in res.stdout.replace("\n", " ").split(" ") if f]

def _system_libs_impl(rctx):
    lines = ['package(default_visibility = ["//visibility:public"])', ""]
    for name, packages in sorted(_PACKAGES.items()):
        cflags = _pkg_config(rctx, "--cflags", packages)
        libs = _pkg_config(rctx, "--libs", packages) + _EXTRA_LINKOPTS.get(name, [])
        defines = _EXTRA_DEFINES.get(name, [])
        lines.append("cc_library(")
        lines.append('    name = "{}",'.format(name))
        lines.append("    copts = {},".format(repr([f for f in cflags if not f.startswith("-I/usr/include")])))
        lines.append("    defines = {},".format(repr(defines)))
        lines.append("    linkopts = {},".format(repr(libs)))
        lines.append(")")
        lines.append("")
    # gRPC's reflection service, for the server alone: a binary that links it registers the
    # reflection protos, so a test that has its own generated copy must not.
    lines.append('cc_library(name = "grpc_reflection", linkopts = ["-lgrpc++_reflection"], deps = [":grpc"])')
    lines.append("")
    lines.append('exports_files(["protoc", "grpc_cpp_plugin", "grpc/health/v1/health.proto", "grpc/reflection/v1alpha/reflection.proto"])')
    rctx.symlink(rctx.which("protoc"), "protoc")
    # The standard health and reflection APIs (Debian's grpc-proto), for their clients.
    for proto in ["grpc/health/v1/health.proto", "grpc/reflection/v1alpha/reflection.proto"]:
        rctx.symlink("/usr/share/grpc-proto/" + proto, proto)
    rctx.symlink(rctx.which("grpc_cpp_plugin"), "grpc_cpp_plugin")
    rctx.file("BUILD", "\n".join(lines))

system_libs = repository_rule(
    implementation = _system_libs_impl,
    local = True,
)
