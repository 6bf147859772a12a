"""The Python client's CUDA IPC (client/python/README.md "Shared memory") against a CUDA build of
the server on this GPU: a CUDA tensor is registered by its allocation and read where it lies,
with the bits of an inline call; registrations are cached per allocation, let go once the
tensor is gone (its memory returns to torch's allocator), and a non-contiguous tensor, labels
and logits still work. Skipped without a GPU.

Run on the GPU machine (tools/gpu/test.sh shm does, with the server it builds):
  LMHEAD_SERVER=/tmp/lmhead-build/lmhead_server PYTHONPATH=client/python \\
      python3 -m pytest -q -p no:cacheprovider tests/gpu/test_python_cuda_ipc.py
"""

import gc
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests/e2e_python"))  # server_process
sys.path.insert(0, str(REPO / "client/python"))

from lmhead_client import RemoteLMHead  # noqa: E402
from server_process import SERVER, ServerProcess  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
D, V = 256, 512


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not SERVER.exists():
        pytest.skip(f"{SERVER} is missing (set LMHEAD_SERVER to a CUDA build of lmhead_server)")
    process = ServerProcess(["--allow_shared_memory", "--device", "cuda:0", "--max_batch_tokens",
                             "1", "--demo_d_model", str(D), "--demo_vocab_size", str(V)],
                            tmp_path_factory.mktemp("server"))
    yield process
    process.stop()


def _leaves(value):
    """The tensors of a forward's result (None where an output is absent), in order."""
    if isinstance(value, tuple):
        return [leaf for part in value for leaf in _leaves(part)]
    return [value]


def _same(got, want, what=""):
    got, want = _leaves(got), _leaves(want)
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        assert (g is None) == (w is None), what
        if g is not None:
            assert g.dtype == w.dtype and g.shape == w.shape, what
            assert g.reshape(-1).view(torch.uint8).equal(w.reshape(-1).view(torch.uint8)), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_tensors_go_by_ipc_with_the_inline_bits(server, dtype):
    gen = torch.Generator().manual_seed(0)
    x_host = torch.randn(4, 300, D, generator=gen).to(dtype)
    labels = torch.randint(0, V, (4, 300), generator=gen)
    x = x_host.cuda()
    with RemoteLMHead(server.address, shared_memory="off") as inline, \
            RemoteLMHead(server.address, shared_memory="on") as shared:
        for what, args in (("logits", dict()),
                           ("labels and logits", dict(labels=labels, z_loss_multiplier=1e-4)),
                           ("labels on the GPU", dict(labels=labels.cuda(), return_logits=False)),
                           ("per-token", dict(labels=labels, loss_reduction="none",
                                              return_argmax=True))):
            _same(shared.forward(x, **args), inline.forward(x_host, **args), what)
        # One registration for the allocation, whatever the calls.
        assert shared._shm.stats["cuda_calls"] == 4, shared._shm.stats
        assert shared._shm.stats["cuda_registrations"] == 1, shared._shm.stats
        # A slice of the same tensor: the same registration, at an offset.
        _same(shared.forward(x[1:3, 10:]), inline.forward(x_host[1:3, 10:]), "a slice")
        assert shared._shm.stats["cuda_registrations"] <= 2, shared._shm.stats
        # A stream of micro-batches of one tensor: views of one allocation.
        _same(shared.forward_stream(x, micro_batch_size=1, labels=labels, loss_reduction="none"),
              inline.forward_stream(x_host, micro_batch_size=1, labels=labels,
                                    loss_reduction="none"), "stream")
        # Not contiguous: made contiguous (on the GPU), then shared.
        xt = x.transpose(0, 1).contiguous().transpose(0, 1)
        _same(shared.forward(xt, labels=labels), inline.forward(x_host, labels=labels),
              "transposed")
    assert re.search(r"registered shared memory region .* bytes on cuda:0", server.log())


def test_a_registration_lets_go_of_its_tensor(server):
    torch.cuda.synchronize()
    gc.collect()
    baseline = torch.cuda.memory_allocated()
    with RemoteLMHead(server.address, shared_memory="on") as head:
        for i in range(3):
            x = torch.randn(2, 4096, D, device="cuda")  # 8 MiB, an allocation of its own
            head.forward(x, labels=torch.randint(0, V, (2, 4096)), return_logits=False)
            del x
        assert head._shm.stats["cuda_calls"] == 3, head._shm.stats
        # Tensors the caller dropped are unregistered at the next call (or close()), and their
        # memory is torch's again: not kept in torch's IPC limbo, not pinned by the client.
        assert len(head._shm._cuda) <= 1
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline


def test_many_allocations_stay_within_the_cache(server):
    with RemoteLMHead(server.address, shared_memory="on") as head:
        # 12 MiB and more: each an allocation of its own (torch's caching allocator).
        keep = [torch.randn(1, 12288 + 64 * i, D, device="cuda") for i in range(20)]
        for x in keep:
            head.forward(x, labels=torch.randint(0, V, tuple(x.shape[:2])), return_logits=False)
        assert head._shm.stats["cuda_calls"] == 20, head._shm.stats
        assert head._shm.stats["cuda_registrations"] == 20, head._shm.stats
        assert len(head._shm._cuda) == 16  # the oldest unregistered (LRU)
    assert len(re.findall(r"unregistered shared memory region", server.log())) >= 4


def test_without_cuda_ipc_a_cuda_tensor_is_copied_into_system_shared_memory(server):
    x_host = torch.randn(3, 500, D)
    labels = torch.randint(0, V, (3, 500))
    with RemoteLMHead(server.address, shared_memory="off") as inline, \
            RemoteLMHead(server.address, shared_memory="on") as shared:
        shared._shm._cuda_off = "as on a server built without CUDA"
        _same(shared.forward(x_host.cuda(), labels=labels.cuda()),
              inline.forward(x_host, labels=labels), "copied")
        assert shared._shm.stats["system_calls"] == 1 and not shared._shm.stats["cuda_calls"]
