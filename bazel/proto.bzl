"""cc_grpc_library: C++ message and gRPC stub code from one .proto, with Debian's protoc.

Bazel 4.2.3 offline has no rules_proto/grpc rules, so a genrule runs protoc with the
grpc_cpp_plugin and a cc_library wraps what it writes.
"""

def cc_grpc_library(
        name,
        proto,
        proto_path = None,
        import_name = None,
        out_dir = "",
        deps = [],
        extra_header = None,
        **kwargs):
    """Generates <import_name>.pb.{h,cc} and .grpc.pb.{h,cc} and wraps them in a cc_library.

    Args:
      name: the cc_library's name.
      proto: label of the .proto file.
      proto_path: the protoc import root (-I), relative to the execution root; default this
        repository's root ("." in lmhead's workspace, "external/lmhead" in one that depends on it).
      import_name: the proto's path under proto_path, without ".proto" (its import name);
        defaults to the package-relative path of `proto`.
      out_dir: folder under this package's output folder where the files are written; the
        cc_library adds it to the include path (so includes read "<import_name>.pb.h" from it).
        With the default "" and proto_path, includes are relative to the repository's root.
      deps: further cc_library deps (other generated protos).
      extra_header: a header of this package that the generated .grpc.pb.h includes (by its
        workspace path) and the cc_library exports, e.g. SerializationTraits specialisations.
      **kwargs: passed on to the cc_library (visibility, ...).
    """
    if import_name == None:
        import_name = proto[:-len(".proto")]
    # Where this repository's files are, relative to the execution root (and under $(GENDIR)).
    repository = native.repository_name()  # "@" here, "@lmhead" in a workspace depending on us
    repository_root = "external/" + repository[1:] if repository != "@" else ""
    prefix = out_dir + "/" if out_dir else ""
    suffixes = [".pb.h", ".pb.cc", ".grpc.pb.h", ".grpc.pb.cc"]
    outs = [prefix + import_name + s for s in suffixes]
    gen_root = "/".join([p for p in ["$(GENDIR)", repository_root, native.package_name(), out_dir] if p])
    if proto_path == None:
        proto_path = repository_root or "."
        if not out_dir:
            # Import names already start with the package.
            gen_root = "/".join([p for p in ["$(GENDIR)", repository_root] if p])
            outs = [o[len(native.package_name()) + 1:] for o in outs]
    native.genrule(
        name = name + "_gen",
        srcs = [proto],
        outs = outs,
        tools = ["@system_libs//:protoc", "@system_libs//:grpc_cpp_plugin"],
        cmd = " ".join([
            "$(location @system_libs//:protoc)",
            "--proto_path=" + proto_path,
            "--cpp_out=" + gen_root,
            "--grpc_out=" + (
                "additional_header_includes=" + native.package_name() + "/" + extra_header + ":" +
                gen_root if extra_header else gen_root
            ),
            "--plugin=protoc-gen-grpc=$(location @system_libs//:grpc_cpp_plugin)",
            "$(location {})".format(proto),
        ]),
    )
    native.cc_library(
        name = name,
        srcs = [o for o in outs if o.endswith(".cc")],
        hdrs = [o for o in outs if o.endswith(".h")] + ([extra_header] if extra_header else []),
        includes = [out_dir] if out_dir else [],
        deps = deps + ["@system_libs//:grpc", "@system_libs//:protobuf"],
        **kwargs
    )
