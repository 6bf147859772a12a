"""--malloc_huge_pages (docs/notes/huge_pages.md): the server restarts itself once with
glibc.malloc.hugetlb=1 in GLIBC_TUNABLES, keeps an operator's own setting, and leaves the
environment alone with the flag off; it serves the same answers either way."""

import os
from pathlib import Path

import numpy as np
import pytest

from lmhead_client import RemoteLMHead


def environment(pid: int) -> dict:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in entries if b"=" in e)


def loss(server) -> float:
    x = np.random.default_rng(0).standard_normal((2, 8, 64), dtype=np.float32)
    labels = np.arange(16, dtype=np.int64).reshape(2, 8) % 8
    with RemoteLMHead(server.address, shared_memory="off") as head:
        return float(head.forward(x, labels=labels, return_logits=False).loss)


@pytest.mark.parametrize("given, flag, expected", [
    (None, [], "glibc.malloc.hugetlb=1"),
    ("glibc.malloc.hugetlb=0", [], "glibc.malloc.hugetlb=0"),
    ("glibc.malloc.check=0", [], "glibc.malloc.check=0:glibc.malloc.hugetlb=1"),
    (None, ["--malloc_huge_pages=false"], None),
    ("glibc.malloc.check=0", ["--malloc_huge_pages=false"], "glibc.malloc.check=0"),
])
def test_glibc_tunables(start_server, given, flag, expected):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if given is not None:
        env["GLIBC_TUNABLES"] = given
    server = start_server(["--demo_vocab_size", "8"] + flag, env=env)
    # The server logs the variable as it reads it (glibc may rewrite the bytes that
    # /proc/PID/environ shows while it parses them).
    if expected is None:
        assert "GLIBC_TUNABLES" not in environment(server.process.pid)
        assert "malloc: GLIBC_TUNABLES" not in server.log()
    elif "hugetlb" not in expected:
        assert "malloc: GLIBC_TUNABLES" not in server.log()
    else:
        assert f"malloc: GLIBC_TUNABLES={expected};" in server.log()
    reference = start_server(["--demo_vocab_size", "8", "--malloc_huge_pages=false"], env=env)
    assert loss(server) == loss(reference)
