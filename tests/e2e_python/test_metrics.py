"""The Prometheus endpoint (--metrics_port; docs/OPERATIONS.md): after known calls, a scrape of
the real server shows them counted by method, model and code, the forwards' tokens and phase
histograms, the batch sizes and the gauges."""

import os
from pathlib import Path

import grpc
import pytest
import torch

from lmhead_client import LMHeadError, RemoteLMHead
from server_process import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(["--metrics_port", "0", "--max_batch_tokens", "1"],
                            tmp_path_factory.mktemp("metrics"))
    yield process
    process.stop()


def scrape(server) -> dict:
    return server.metrics()


def test_calls_tokens_phases_and_gauges_are_counted(server):
    torch.manual_seed(0)
    with RemoteLMHead(server.address, shared_memory="off", max_attempts=1) as head:
        head.list_models()
        head.forward(torch.randn(2, 3, 64), labels=torch.randint(1000, (2, 3)))
        head.forward_stream(torch.randn(4, 5, 64), labels=torch.randint(1000, (4, 5)),
                            micro_batch_size=2, parallel_streams=1)
        with pytest.raises(LMHeadError):
            head.forward(torch.randn(1, 2, 32))  # wrong d_model
        with pytest.raises(LMHeadError):
            RemoteLMHead(server.address, model="missing", shared_memory="off",
                         max_attempts=1).forward(torch.randn(1, 2, 64))
    samples = scrape(server)
    count = lambda method, model, code: samples.get(
        f'lmhead_request_total{{code="{code}",method="{method}",model="{model}"}}', 0)
    assert count("ListModels", "", "OK") == 1
    assert count("Forward", "demo", "OK") == 1
    assert count("ForwardStream", "", "OK") == 1
    assert count("Forward", "demo", "INVALID_ARGUMENT") == 1
    assert count("Forward", "", "NOT_FOUND") == 1  # a name that is not loaded: no label
    # One unary forward of 6 tokens, two micro-batches of 10 tokens each.
    assert samples['lmhead_tokens_total{model="demo"}'] == 26
    assert samples['lmhead_scored_tokens_total{model="demo"}'] == 26
    for phase in ("decode", "queue", "compute", "encode"):
        assert samples[f'lmhead_request_duration_us_count{{model="demo",phase="{phase}"}}'] == 3
    assert samples['lmhead_request_duration_us_sum{model="demo",phase="compute"}'] > 0
    assert samples["lmhead_batch_size_count"] == 3
    assert samples["lmhead_batch_size_sum"] == 3  # --max_batch_tokens 1: one call per batch
    assert samples["lmhead_queue_tokens"] == 0
    assert samples["lmhead_inflight_calls"] == 0
    # A CPU server has no device-memory gauges (tests/gpu/test_device_metrics.py checks them).
    assert not [name for name in samples if name.startswith("lmhead_device_memory_")]


def test_a_bad_metrics_port_stops_the_server(tmp_path):
    with pytest.raises(RuntimeError, match="--metrics_port: expected -1"):
        ServerProcess(["--metrics_port", "70000"], tmp_path)


@pytest.mark.skipif(not os.environ.get("LMHEAD_CUDA_SERVER"),
                    reason="LMHEAD_CUDA_SERVER: a --config=cuda build of lmhead_server")
def test_the_cuda_build_serves_metrics(tmp_path):
    """The CUDA libraries' static TLS is larger than the 100 KiB thread stacks civetweb asks
    for: the endpoint used not to start in a --config=cuda server (docs/notes/thread_stacks.md).
    Runs on the CPU: it needs the build, not a GPU."""
    server = ServerProcess(["--metrics_port", "0"], tmp_path,
                           binary=Path(os.environ["LMHEAD_CUDA_SERVER"]))
    try:
        torch.manual_seed(0)
        with RemoteLMHead(server.address, shared_memory="off") as head:
            head.forward(torch.randn(1, 3, 64), labels=torch.randint(1000, (1, 3)))
        samples = server.metrics()
        assert samples['lmhead_request_total{code="OK",method="Forward",model="demo"}'] == 1
        assert samples["lmhead_queue_tokens"] == 0
    finally:
        assert server.stop() == 0, server.log()[-3000:]
