"""lmhead_fuzzer: one libFuzzer target, its seed corpus and its saved crashes (docs/FUZZING.md).

A fuzz target builds only with --config=fuzz (clang, -fsanitize=fuzzer,address,undefined); in any
other configuration it is incompatible, so `bazel build //...` and `bazel test //...` skip it.
"""

def lmhead_fuzzer(name, deps = [], **kwargs):
    """Declares the fuzz target `<name>_fuzzer` built from `<name>_fuzzer.cc`.

    Its seeds live in corpus/<name>/ and the inputs of past crashes in regressions/<name>/;
    tools/fuzz.sh finds the target by its tag, fuzzes from a copy of the seeds and replays the
    regressions.

    Args:
      name: the target's short name; also the name of its corpus and regressions folders.
      deps: the libraries under test.
      **kwargs: passed on to the cc_binary.
    """
    native.cc_binary(
        name = name + "_fuzzer",
        srcs = [name + "_fuzzer.cc"],
        # Only with --config=fuzz: in other configurations the target is never built. Its
        # dependencies name tests/fuzz in their visibility, as declared friends.
        deps = select({
            "//bazel:fuzz": deps,
            "//conditions:default": [],
        }),
        # The objects are compiled with -fsanitize=fuzzer-no-link (.bazelrc); this links
        # libFuzzer's main.
        linkopts = ["-fsanitize=fuzzer"],
        tags = ["lmhead_fuzzer"],
        testonly = True,
        target_compatible_with = select({
            "//bazel:fuzz": [],
            "//conditions:default": ["@platforms//:incompatible"],
        }),
        **kwargs
    )
