"""bench/e2e_bench.py (issue 13's end-to-end benchmark) runs on the CPU at a small shape: every
row it promises (Python client with 1 and 2 streams and through system shared memory, the
reference server, the CLI when built) and the ratio line. The figures themselves are measured on
the GPU machine (where the CUDA IPC row is added)."""

import re
import subprocess
import sys

from server_process import CLIENT, REPO, SERVER


def test_e2e_bench_runs_at_a_small_shape(server_binary):
    cli = REPO / "bazel-bin/client/lmhead"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench/e2e_bench.py"), "--lmhead", str(SERVER),
         "--cli", str(cli) if cli.exists() else "", "--d_model", "64", "--vocab_size", "1000",
         "--tokens", "512", "--rows", "4", "--micro_batch_mib", "0.0625", "--repeat", "1",
         "--streams", "1,2", "--kernel_tokens_per_s", "1e6"],
        capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(CLIENT)})
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    for row in ("lmhead, Python client, 1 stream", "lmhead, Python client, 2 streams",
                "lmhead, Python client, system shared memory, 0.0625 MiB",
                "lmhead, Python client, system shared memory, 0.015625 MiB",
                "reference, Python client, 1 stream", "reference, Python client, 2 streams"):
        assert re.search(re.escape(row) + r" +[0-9.]+ ms +[0-9]+ tokens/s, +[0-9.]+% of kernel",
                         out), out
    if cli.exists():
        assert "lmhead, CLI (file to file), 2 streams" in out, out
    assert "CUDA IPC" not in out, out  # only with --device cuda:N
    assert re.search(r"lmhead / reference server .*: [0-9.]+x", out), out
