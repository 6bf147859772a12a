"""A CUDA build of the server on cuda:0 answers as the same build on the CPU: the demo head's
outputs for both loss implementations, one Forward and a job streamed in micro-batches, agree to
rtol 1e-4 / atol 1e-5; and a big bf16 head's streamed job gives the same values whether the
server reads the stream's next micro-batch ahead (the default) or not (--stream_read_ahead=false).
Skipped without a GPU.

Run on the GPU machine (tools/gpu/test.sh server does, with the server it builds):
  LMHEAD_SERVER=/tmp/lmhead-build/lmhead_server PYTHONPATH=client/python \\
      python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_server_matches_cpu.py
"""

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
D, V = 64, 1000  # the demo head's defaults
IMPLEMENTATIONS = ("default", "fused_linear")


def _serve(args, workdir):
    if not SERVER.exists():
        pytest.skip(f"{SERVER} is missing (set LMHEAD_SERVER to a CUDA build of lmhead_server)")
    return ServerProcess(args, workdir)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    started = {device: _serve(["--device", device], tmp_path_factory.mktemp(device))
               for device in ("cpu", "cuda:0")}
    yield {device: RemoteLMHead(s.address, timeout=120) for device, s in started.items()}
    for process in started.values():
        process.stop()


def _fields(output):
    """The tensors of an LMOutputWithLoss by name (None fields left out)."""
    return {name: getattr(output, name) for name in ("logits", "loss", "ce_loss", "z_loss")
            if getattr(output, name, None) is not None}


def _assert_same(got, want, rtol, atol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_one_forward_on_cuda_equals_the_cpu(servers, implementation):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, D, generator=gen)
    labels = torch.randint(0, V, (3, 7), generator=gen)
    labels[0, :2] = -100
    args = dict(labels=labels, z_loss_multiplier=1e-3, loss_reduction="none",
                loss_implementation=implementation)
    outputs = {device: _fields(head.forward(x, **args)) for device, head in servers.items()}
    assert {"loss", "ce_loss"} <= outputs["cpu"].keys()
    _assert_same(outputs["cuda:0"], outputs["cpu"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_streamed_job_on_cuda_equals_the_cpu(servers, implementation):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 256, D, generator=gen)
    labels = torch.randint(0, V, (48, 256), generator=gen)
    labels[5, :7] = -100
    args = dict(labels=labels, loss_reduction="none", return_logits=False,
                loss_implementation=implementation, micro_batch_size=16)  # 3 micro-batches
    outputs = {device: _fields(head.forward_stream(x, **args))
               for device, head in servers.items()}
    assert outputs["cpu"]["loss"].shape == (48, 256)
    _assert_same(outputs["cuda:0"], outputs["cpu"], rtol=1e-4, atol=1e-5)


def test_reading_the_stream_ahead_changes_no_value(tmp_path):
    big = ["--device", "cuda:0", "--demo_d_model", "4096", "--demo_vocab_size", "128256",
           "--demo_dtype", "bfloat16"]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 2048, 4096, generator=gen)  # 256 MiB of fp32: 4 micro-batches of 64 MiB
    labels = torch.randint(0, 128256, (8, 2048), generator=gen)
    outputs = []
    for name, extra in (("ahead", []), ("one_at_a_time", ["--stream_read_ahead=false"])):
        process = _serve(big + extra, tmp_path / name)
        try:
            head = RemoteLMHead(process.address, timeout=300)
            outputs.append(_fields(head.forward_stream(
                x, labels=labels, loss_reduction="none", return_logits=False,
                loss_implementation="fused_linear", micro_batch_size=2, parallel_streams=1)))
        finally:
            process.stop()
    assert outputs[0]["loss"].shape == (8, 2048)
    assert torch.isfinite(outputs[0]["loss"]).all()
    _assert_same(outputs[0], outputs[1], rtol=1e-6, atol=0)
