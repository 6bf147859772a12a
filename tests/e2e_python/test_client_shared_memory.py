"""RemoteLMHead's shared memory (client/python/README.md "Shared memory") against the real server:
the same bits as inline calls for every kind of input and output, streams, threads, the fallback
when the server does not allow it, "on" failing clearly, and cleaning up (close, garbage
collection, a killed client). The server runs with --max_batch_tokens 1, so that no call is
packed with another and results can be compared bit for bit."""

import gc
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from lmhead_client import BF16, LMHeadError, RemoteLMHead
from lmhead_client import _shared_memory, _tensors
from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb
from server_process import CLIENT

D, V = 64, 1000
BIG = 1 << 20  # "auto"'s threshold (AUTO_MIN_BYTES)


@pytest.fixture
def server(start_server):
    return start_server(["--allow_shared_memory", "--max_batch_tokens", "1"])


@pytest.fixture
def plain_server(start_server):
    return start_server(["--max_batch_tokens", "1"])


def _leaves(value):
    """The tensors of a forward's result (None where an output is absent), in order."""
    if isinstance(value, tuple):
        return [leaf for part in value for leaf in _leaves(part)]
    return [value]


def _same(got, want, what=""):
    got, want = _leaves(got), _leaves(want)
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"{what}: output {i}"
        if g is None:
            continue
        assert type(g) is type(w), f"{what}: output {i}"
        if isinstance(g, torch.Tensor):
            assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: output {i}"
            assert torch.equal(g.view(torch.uint8) if g.dim() else g, w.view(torch.uint8)
                               if w.dim() else w), f"{what}: output {i}"
        else:
            assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: output {i}"
            assert g.tobytes() == w.tobytes(), f"{what}: output {i}"


def _shm_names(pid=None):
    prefix = f"lmhead-{pid or os.getpid()}-"
    return [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


def _mapped(pid=None):
    """This process's mappings of its own shared-memory objects (/proc/PID/maps)."""
    prefix = f"/dev/shm/lmhead-{pid or os.getpid()}-"
    return [line for line in Path(f"/proc/{pid or os.getpid()}/maps").read_text().splitlines()
            if prefix in line]


def _in_threads(run, count: int) -> None:
    """run(0), ..., run(count - 1) at once, each on a thread of its own; returns when all end."""
    threads = [threading.Thread(target=run, args=(t,)) for t in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _wait_for(predicate, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


CASES = {
    "fp32, logits": lambda x, y: dict(),
    "fp32, labels and logits": lambda x, y: dict(labels=y, z_loss_multiplier=1e-4),
    "labels, no logits": lambda x, y: dict(labels=y, return_logits=False),
    "per-token losses, argmax, bf16 logits": lambda x, y: dict(
        labels=y, loss_reduction="none", return_argmax=True, logits_dtype="bf16"),
    "fused_linear": lambda x, y: dict(labels=y, loss_implementation="fused_linear",
                                      z_loss_multiplier=1e-3),
    "logits_to_keep count": lambda x, y: dict(labels=y, logits_to_keep=5),
    "logits_to_keep negative": lambda x, y: dict(logits_to_keep=-3),
    "logits_to_keep positions": lambda x, y: dict(
        logits_to_keep=torch.tensor([[0, 3], [1, 1], [7, 2]]), return_argmax=True),
    "int32 labels, sum": lambda x, y: dict(labels=y.to(torch.int32), loss_reduction="sum"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_calls_give_the_inline_bits(server, dtype, case):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, D, generator=gen).to(dtype)
    y = torch.randint(0, V, (3, 40), generator=gen)
    y[0, :3] = -100
    args = CASES[case](x, y)
    with RemoteLMHead(server.address, shared_memory="off") as inline, \
            RemoteLMHead(server.address, shared_memory="on") as shared:
        _same(shared.forward(x, **args), inline.forward(x, **args), case)
        assert shared._shm.stats["system_calls"] == 1
        assert shared.shared_memory_active


def test_numpy_bf16_and_strided_inputs_give_the_inline_bits(server):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 50, D), dtype=np.float32)
    y = rng.integers(0, V, (4, 50))
    strided = torch.randn(D, 50, 4).permute(2, 1, 0)  # not contiguous
    with RemoteLMHead(server.address, shared_memory="off") as inline, \
            RemoteLMHead(server.address, shared_memory="on") as shared:
        for what, value, args in (
                ("numpy fp32", x, dict(labels=y, loss_reduction="none")),
                ("numpy fp16", x.astype(np.float16), dict(labels=y.astype(np.int32))),
                ("numpy bf16 bits", BF16.from_float32(x), dict(labels=y)),
                ("a numpy view", x[::2, 3:40], dict(labels=y[::2, 3:40])),
                ("a permuted tensor", strided, dict(labels=torch.from_numpy(y)))):
            _same(shared.forward(value, **args), inline.forward(value, **args), what)
        assert shared._shm.stats["system_calls"] == 5


def test_bad_inputs_get_the_inline_answers(server):
    x = torch.randn(2, 8, D)
    with RemoteLMHead(server.address, shared_memory="off") as inline, \
            RemoteLMHead(server.address, shared_memory="on") as shared:
        for args in (dict(labels=torch.full((2, 8), V + 5)),        # a label out of range
                     dict(labels=torch.zeros(2, 7, dtype=torch.long)),  # labels' shape
                     dict(labels=torch.zeros(2, 8), return_logits=False)):  # float labels
            errors = []
            for head in (inline, shared):
                with pytest.raises(LMHeadError) as e:
                    head.forward(x, **args)
                errors.append((e.value.code, e.value.details))
            assert errors[0] == errors[1]
        with pytest.raises(LMHeadError) as e:
            shared.forward(torch.randn(2, 8, D - 1))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details.startswith("hidden_states.shape")
        with pytest.raises(TypeError):
            shared.forward(torch.randn(2, 8, D, dtype=torch.float64))


def test_auto_uses_shared_memory_for_large_calls_only(server):
    small = torch.randn(1, 16, D)                              # 4 KiB
    large = torch.randn(4, BIG // (4 * D * 4) + 1, D)          # just over 1 MiB
    with RemoteLMHead(server.address, shared_memory="off") as inline, \
            RemoteLMHead(server.address) as auto:
        _same(auto.forward(small), inline.forward(small))
        assert not auto.shared_memory_active and not auto._shm.stats
        _same(auto.forward(large), inline.forward(large))
        assert auto.shared_memory_active and auto._shm.stats["system_calls"] == 1
        # Small calls with large logits (here 64 positions x 1000 x 4 bytes x 5 rows) too.
        wide = torch.randn(5, 64, D)
        _same(auto.forward(wide), inline.forward(wide))
        assert auto._shm.stats["system_calls"] == 2


def test_a_full_dev_shm_sends_inline_or_fails_clearly(server, monkeypatch):
    """A /dev/shm without room (a container's 64 MiB) is found when the object is made, not as
    SIGBUS when it is written: "auto" sends that call inline, "on" says why."""
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_shared_memory.os, "posix_fallocate", full)
    large = torch.randn(4, BIG // (4 * D * 4) + 1, D)
    with RemoteLMHead(server.address, shared_memory="off") as inline, \
            RemoteLMHead(server.address) as auto:
        _same(auto.forward(large), inline.forward(large))
        assert not auto._shm.stats.get("system_calls")
    with RemoteLMHead(server.address, shared_memory="on") as on:
        with pytest.raises(LMHeadError) as e:
            on.forward(large)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "No space left on device" in e.value.details
    assert not _shm_names()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_streams_give_the_inline_bits(server, reduction):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(14, 64, D, generator=gen).to(torch.bfloat16)
    y = torch.randint(0, V, (14, 64), generator=gen)
    args = dict(labels=y, loss_reduction=reduction, return_argmax=True, z_loss_multiplier=1e-4)
    with RemoteLMHead(server.address, shared_memory="off") as inline, \
            RemoteLMHead(server.address, shared_memory="on") as shared:
        # One inline stream (parallel_streams' default is 4), as the log's count below expects.
        want = inline.forward_stream(x, micro_batch_size=3, parallel_streams=1, **args)
        _same(shared.forward_stream(x, micro_batch_size=3, **args), want)
        # parallel_streams is not needed with shared memory: one stream, the same answer.
        _same(shared.forward_stream(x, micro_batch_size=3, parallel_streams=3, **args), want)
        micro_batches = list(shared.iter_forward_stream(x, micro_batch_size=3, **args))
        want_micro_batches = list(inline.iter_forward_stream(x, micro_batch_size=3, **args))
        assert [(c.start, c.stop, c.num_scored_tokens) for c in micro_batches] == \
            [(c.start, c.stop, c.num_scored_tokens) for c in want_micro_batches]
        for got, expected in zip(micro_batches, want_micro_batches):
            _same(got.output, expected.output)
        assert shared._shm.stats["system_calls"] == 3 * 5
        # Each micro-batch in flight had a buffer of its own, at most STREAM_WINDOW at once,
        # reused by the later ones.
        assert shared._shm.stats["most_buffers"] <= _shared_memory.STREAM_WINDOW
    # Five streams of all five micro-batches: parallel_streams=3 sent one.
    assert re.findall(r"ForwardStream \d+ micro-batches", server.log()) == \
        ["ForwardStream 5 micro-batches"] * 5


def test_a_stream_abandoned_midway_gives_its_buffers_back(server):
    x = torch.randn(12, 64, D)
    with RemoteLMHead(server.address, shared_memory="on") as head:
        micro_batches = head.iter_forward_stream(x, micro_batch_size=1)
        next(micro_batches)
        micro_batches.close()  # cancels the stream
        assert _wait_for(lambda: len(head._shm._free) == head._shm._buffers)
        _same(head.forward(x), RemoteLMHead(server.address, shared_memory="off").forward(x))


def test_concurrent_calls_from_threads(server):
    gen = torch.Generator().manual_seed(4)
    inputs = [(torch.randn(2, 30 + i, D, generator=gen),
               torch.randint(0, V, (2, 30 + i), generator=gen)) for i in range(24)]
    with RemoteLMHead(server.address, shared_memory="off") as inline:
        want = [inline.forward(x, labels=y, loss_reduction="none") for x, y in inputs]
    got = [None] * len(inputs)
    errors = []
    with RemoteLMHead(server.address, shared_memory="on") as shared:
        def run(first):
            try:
                for _ in range(3):
                    for i in range(first, len(inputs), 8):
                        x, y = inputs[i]
                        got[i] = shared.forward(x, labels=y, loss_reduction="none")
                        _same(got[i], want[i], f"call {i}")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        _in_threads(run, 8)
        assert not errors, errors[0]
        assert shared._shm.stats["system_calls"] == 3 * len(inputs)
        # Calls in flight at once had buffers of their own, never more than MAX_BUFFERS.
        assert 2 <= shared._shm.stats["most_buffers"] <= _shared_memory.MAX_BUFFERS


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_a_server_with_few_regions_gets_no_more(start_server, mode):
    server = start_server(["--allow_shared_memory", "--max_batch_tokens", "1",
                           "--max_shared_memory_regions", "2"])
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(2, 2048 + 64 * i, D, generator=gen) for i in range(12)]
    with RemoteLMHead(server.address, shared_memory="off") as inline:
        want = [inline.forward(x, return_logits=False, labels=torch.zeros(x.shape[:2],
                                                                          dtype=torch.long))
                for x in inputs]
    errors = []
    with RemoteLMHead(server.address, shared_memory=mode) as head:
        def run(first):
            try:
                for i in range(first, len(inputs), 6):
                    x = inputs[i]
                    _same(head.forward(x, return_logits=False,
                                       labels=torch.zeros(x.shape[:2], dtype=torch.long)),
                          want[i], f"call {i}")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        _in_threads(run, 6)
        assert not errors, errors[0]
        assert head._shm._buffers <= 2 and head.shared_memory_active
        if mode == "on":
            assert head._shm.stats["system_calls"] == len(inputs)


def test_without_allow_shared_memory_auto_goes_inline_for_good(plain_server, caplog):
    x = torch.randn(4, 2048, D)  # 2 MiB
    with RemoteLMHead(plain_server.address, shared_memory="off") as inline, \
            RemoteLMHead(plain_server.address) as auto:
        with caplog.at_level("DEBUG", logger="lmhead_client"):
            for _ in range(3):
                _same(auto.forward(x), inline.forward(x))
            _same(auto.forward_stream(x, micro_batch_size=2, parallel_streams=2),
                  inline.forward_stream(x, micro_batch_size=2))
        assert not auto.shared_memory_active
        assert "--allow_shared_memory" in auto._shm._off
    # Asked once, logged once.
    assert len(re.findall(r"SharedMemory .*FAILED_PRECONDITION", plain_server.log())) == 1
    assert sum("shared memory with" in r.getMessage() for r in caplog.records) == 1
    assert not _shm_names()


def test_on_fails_clearly_without_allow_shared_memory(plain_server):
    with RemoteLMHead(plain_server.address, shared_memory="on") as head:
        with pytest.raises(LMHeadError) as e:
            head.forward(torch.randn(1, 4, D))
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert e.value.details.startswith("shared_memory='on': the server refused a shared "
                                          "memory session: ")
        assert "--allow_shared_memory" in e.value.details
    with pytest.raises(ValueError, match="shared_memory"):
        RemoteLMHead(plain_server.address, shared_memory="yes")
    assert not _shm_names()


def test_close_unmaps_and_ends_the_session(server):
    x = torch.randn(4, 1024, D)
    head = RemoteLMHead(server.address, shared_memory="on")
    head.forward(x)
    head.forward_stream(x, micro_batch_size=1)
    # Each object was unlinked once the server had mapped it: nothing to leave in /dev/shm.
    assert not _shm_names()
    assert _mapped()
    region = head._shm._free[0].region
    head._shm.close()  # what close() does first: the session ends, the buffers are unmapped
    assert not _mapped()
    assert _wait_for(lambda: re.search(
        r"SharedMemory session of \d+ requests, [1-9]\d* regions? unregistered at its end",
        server.log()))
    # A request naming the old region on the same connection: the server no longer has it.
    wire = _tensors.WireRequest(pb.ForwardRequest(hidden_states=pb.Tensor(
        dtype=pb.DATA_TYPE_FP32, shape=list(x.shape),
        shared_memory=pb.SharedMemoryRef(region=region, byte_size=x.numel() * 4))))
    with pytest.raises(grpc.RpcError) as e:
        head._forward(wire, timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details().startswith("hidden_states.shared_memory.region: no region")
    head.close()
    head.close()  # idempotent


def test_a_stale_region_or_logits_layout_is_retried(server):
    x = torch.randn(4, 1024, D)
    with RemoteLMHead(server.address, shared_memory="off") as inline, \
            RemoteLMHead(server.address) as auto, \
            RemoteLMHead(server.address, shared_memory="on") as on:
        want = inline.forward(x)
        for head in (auto, on):
            _same(head.forward(x), want)
            # The server drops the client's region behind its back ("auto" goes inline;
            # "on" reports it).
            buffer = head._shm._free[0]
            head._shm._session.request(pb.SharedMemoryRequest(unregister=buffer.region))
            if head is auto:
                _same(head.forward(x), want)
            else:
                with pytest.raises(LMHeadError) as e:
                    head.forward(x)
                assert e.value.code == grpc.StatusCode.NOT_FOUND
            # The buffer is not used again: the next call registers another.
            assert buffer not in head._shm._free
            _same(head.forward(x), want)
            assert head._shm.stats["buffers"] == 2
        # A wrong picture of the model: the logits come back in the response instead.
        on._model_info = pb.ModelInfo(vocab_size=V + 1, dtype=pb.DATA_TYPE_FP32)
        _same(on.forward(x), want)
        assert on._model_info is None or on._model_info.vocab_size == V


def test_a_garbage_collected_client_ends_its_session(server):
    head = RemoteLMHead(server.address, shared_memory="on")
    head.forward(torch.randn(2, 16, D))
    assert _mapped()
    del head
    gc.collect()
    assert _wait_for(lambda: "regions unregistered at its end" in server.log()
                     or "region unregistered at its end" in server.log())
    assert not _mapped() and not _shm_names()
    with RemoteLMHead(server.address, shared_memory="on") as head:
        assert head.forward(torch.randn(2, 16, D)).shape == (2, 16, V)


_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    import torch
    from lmhead_client import RemoteLMHead
    head = RemoteLMHead(sys.argv[1], shared_memory="on")
    head.forward_stream(torch.randn(8, 512, 64), micro_batch_size=2)
    print("ready", flush=True)
    time.sleep(600)
""")


def test_a_killed_client_leaves_the_server_serving_and_nothing_behind(server):
    child = subprocess.Popen([sys.executable, "-c", _CHILD, server.address, str(CLIENT)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        child.kill()  # no close(), no finalizer: the connection just goes
        child.wait()
        assert _wait_for(lambda: "regions unregistered at its end" in server.log())
        assert not _shm_names(child.pid)
        x = torch.randn(2, 512, D)
        with RemoteLMHead(server.address, shared_memory="off") as inline, \
                RemoteLMHead(server.address, shared_memory="on") as head:
            _same(head.forward(x), inline.forward(x))
    finally:
        child.kill()
        child.wait()


def test_cuda_ipc_handles_of_every_torch_format():
    # What UntypedStorage._share_cuda_ gives: 64 raw bytes (older torch), or a version byte,
    # 'c' and the raw bytes (a cudaMalloc block); 'e' (expandable segments) cannot be opened.
    raw = bytes(range(64))
    assert _shared_memory._raw_ipc_handle(raw) == raw
    assert _shared_memory._raw_ipc_handle(b"\x02c" + raw) == raw
    assert _shared_memory._raw_ipc_handle(b"\x03c" + raw) == raw
    assert _shared_memory._raw_ipc_handle(b"\x02e" + raw) is None
    assert _shared_memory._raw_ipc_handle(b"\x02e" + raw + b"more") is None
    assert _shared_memory._raw_ipc_handle(None) is None
