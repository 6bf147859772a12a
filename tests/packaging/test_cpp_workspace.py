"""lmhead's C++ client used from another Bazel workspace: examples/cpp_client (its own WORKSPACE,
which takes lmhead as @lmhead and calls lmhead_dependencies()) is built from a clean copy of the
checkout by Bazel run as that workspace's, and its program calls the real server; its numbers
are the installed Python client's for the same call."""

import shutil
from pathlib import Path

import pytest

from packaging_helpers import run

# The main workspace's disk cache (.bazelrc), so that reruns and CI clones compile little.
DISK_CACHE = Path.home() / ".cache/lmhead/bazel-disk"


def test_example_workspace_builds_and_calls_the_server(clean_tree, server, installed_result,
                                                       tmp_path):
    bazel = shutil.which("bazel")
    if bazel is None:
        pytest.fail("bazel is not installed: run tools/setup.sh")
    workspace = clean_tree / "examples/cpp_client"
    # --batch: no Bazel server stays behind; an output base of its own, removed with tmp_path.
    run([bazel, "--batch", f"--output_base={tmp_path / 'output_base'}", "build",
         f"--disk_cache={DISK_CACHE}", "//:forward"], cwd=workspace)

    out = run([workspace / "bazel-bin/forward", server.address]).stdout
    values = dict(line.split(" ", 1) for line in out.splitlines())
    assert values["health"] == "SERVING", out
    assert values["model"] == "demo d_model 64 vocab_size 1000", out
    assert int(values["num_scored_tokens"]) == 6, out
    for key in ("loss", "ce_loss", "z_loss"):
        assert float(values[key]) == pytest.approx(installed_result[key], rel=1e-6), (key, out)
