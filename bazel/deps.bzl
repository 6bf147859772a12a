"""lmhead_dependencies(): the external repositories lmhead's C++ client needs, offline.

lmhead's own WORKSPACE calls it, and so does a workspace that depends on lmhead, e.g. to use
@lmhead//client:lmhead_client (examples/cpp_client shows one):

    local_repository(name = "lmhead", path = "/path/to/lmhead")
    load("@lmhead//bazel:deps.bzl", "lmhead_dependencies")
    lmhead_dependencies()

It defines, unless the workspace already defines a repository of that name (then yours is used):
  rules_cc               lmhead's stand-in for rules_cc (bazel/local/rules_cc: Debian's is too
                         new for Debian's Bazel 4.2.3)
  remote_coverage_tools  a stand-in that cc_test needs (bazel/local/coverage_tools)
  rules_java, platforms  Debian's bazel-rules-java and bazel-platforms
  system_libs            Debian's gRPC, protobuf, abseil, ... from pkg-config (system_libs.bzl)
lmhead's BUILD files name @system_libs, so that name is taken in a workspace that depends on
lmhead. LibTorch, CUDA and CUTLASS (the server's) are not among them: the client needs none.
"""

load("//bazel:system_libs.bzl", "system_libs")

def _lmhead_folder_impl(rctx):
    # bazel/<folder> of the repository this file belongs to, whatever that repository's name.
    folder = rctx.path(Label("//bazel:deps.bzl")).dirname
    for part in rctx.attr.folder.split("/"):
        folder = folder.get_child(part)
    for child in folder.readdir():
        rctx.symlink(child, child.basename)

# A repository made of one of lmhead's bazel/ folders (a local_repository's path would be
# relative to the workspace that calls lmhead_dependencies, not to lmhead).
_lmhead_folder = repository_rule(
    implementation = _lmhead_folder_impl,
    attrs = {"folder": attr.string(mandatory = True)},
    local = True,
)

def lmhead_dependencies():
    """Defines the repositories above that the workspace does not define yet."""
    if not native.existing_rule("rules_cc"):
        _lmhead_folder(name = "rules_cc", folder = "local/rules_cc")
    if not native.existing_rule("remote_coverage_tools"):
        _lmhead_folder(name = "remote_coverage_tools", folder = "local/coverage_tools")
    if not native.existing_rule("rules_java"):
        native.local_repository(name = "rules_java", path = "/usr/share/bazel/rules/java")
    if not native.existing_rule("platforms"):
        native.local_repository(name = "platforms", path = "/usr/share/bazel/tools/platforms")
    if not native.existing_rule("system_libs"):
        system_libs(name = "system_libs")
