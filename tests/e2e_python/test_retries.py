"""The Python client retries a busy server through gRPC's retry policy, and does not retry a
refusal that the server marks as coming again (grpc-retry-pushback-ms: -1)."""

import threading
import time

import grpc
import pytest
import torch

from lmhead_client import LMHeadError, RemoteLMHead
from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb
from server_process import ServerProcess

D, V = 16, 50


@pytest.fixture(scope="module")
def server(server_binary, tmp_path_factory):
    process = ServerProcess([f"--demo_d_model={D}", f"--demo_vocab_size={V}",
                             "--max_open_streams=1", "--max_response_bytes=10000"],
                            tmp_path_factory.mktemp("retries"))
    yield process
    assert process.stop() == 0, process.log()[-2000:]


def _hold_the_slot(address: str, release: threading.Event, holding: threading.Event):
    """A raw ForwardStream that answers one micro-batch, then keeps the only stream slot until
    `release`."""
    x = torch.randn(1, 2, D)
    request = pb.ForwardRequest(hidden_states=pb.Tensor(
        dtype=pb.DATA_TYPE_FP32, shape=[1, 2, D], data=x.numpy().tobytes()))

    def requests():
        yield request
        release.wait(30)

    with grpc.insecure_channel(address) as channel:
        stream = channel.stream_stream("/lmhead.v1.LMHeadService/ForwardStream",
                                       request_serializer=pb.ForwardRequest.SerializeToString,
                                       response_deserializer=pb.ForwardResponse.FromString)
        for _ in stream(requests(), timeout=60):
            holding.set()


def test_busy_is_retried_until_a_slot_frees(server):
    release, holding = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_the_slot, args=(server.address, release, holding))
    holder.start()
    assert holding.wait(30)
    x = torch.randn(2, 3, D)
    try:
        with RemoteLMHead(server.address, timeout=30, max_attempts=1) as once:
            with pytest.raises(LMHeadError) as error:
                once.forward_stream(x)
            assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        threading.Timer(0.3, release.set).start()
        started = time.monotonic()
        with RemoteLMHead(server.address, timeout=30) as retrying:
            logits = retrying.forward_stream(x)
        assert logits.shape == (2, 3, V)
        assert time.monotonic() - started >= 0.25  # it waited for the slot
    finally:
        release.set()
        holder.join()


def test_a_limit_is_tried_once(server):
    before = server.log().count("the response would carry")
    with RemoteLMHead(server.address, timeout=30) as head:
        with pytest.raises(LMHeadError) as error:
            head.forward(torch.randn(4, 20, D))  # 16000 bytes of logits > 10000
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    deadline = time.time() + 5
    while server.log().count("the response would carry") == before and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # room for any retry to arrive
    assert server.log().count("the response would carry") == before + 1


def test_max_attempts_is_checked():
    with pytest.raises(ValueError, match="max_attempts"):
        RemoteLMHead("127.0.0.1:1", max_attempts=6)
