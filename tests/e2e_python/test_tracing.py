"""Trace ids (docs/API.md "Operations"): a W3C traceparent from the call's metadata becomes the
request id of every log line of the call (unless an x-request-id is given) and is echoed in the
response's metadata, with the request id."""

import grpc
import numpy as np
import pytest

from lmhead_client import RemoteLMHead
from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb
from lmhead_client._proto.lmhead.v1 import lmhead_pb2_grpc as pb_grpc
from server_process import ServerProcess

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess([], tmp_path_factory.mktemp("tracing"))
    yield process
    process.stop()


def call(server, metadata, model=None):
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LMHeadServiceStub(channel)
        if model is None:
            _, rendezvous = stub.ListModels.with_call(pb.ListModelsRequest(), metadata=metadata,
                                                      timeout=30)
            return dict(rendezvous.initial_metadata())
        with pytest.raises(grpc.RpcError) as error:
            stub.GetModel(pb.GetModelRequest(name=model), metadata=metadata, timeout=30)
        return dict(error.value.trailing_metadata())


def test_traceparent_becomes_the_request_id_and_is_echoed(server):
    headers = call(server, [("traceparent", TRACEPARENT)])
    assert headers["x-request-id"] == TRACE_ID
    assert headers["traceparent"] == TRACEPARENT
    # A failed call echoes both in its trailers.
    trailers = call(server, [("traceparent", TRACEPARENT)], model="missing")
    assert trailers["x-request-id"] == TRACE_ID and trailers["traceparent"] == TRACEPARENT
    log = server.log()
    assert f"request_id={TRACE_ID} ListModels ok" in log
    assert f"request_id={TRACE_ID} GetModel name='missing' failed: NOT_FOUND" in log


def test_later_versions_are_read_by_their_first_fields(server):
    later = f"01-{TRACE_ID}-00f067aa0ba902b7-01-what-comes-next"
    headers = call(server, [("traceparent", later)])
    assert headers["x-request-id"] == TRACE_ID and headers["traceparent"] == later


def test_x_request_id_wins_and_invalid_traceparents_are_ignored(server):
    headers = call(server, [("traceparent", TRACEPARENT), ("x-request-id", "mine-1")])
    assert headers["x-request-id"] == "mine-1" and headers["traceparent"] == TRACEPARENT
    for bad in (TRACEPARENT.upper(), "ff" + TRACEPARENT[2:], f"00-{'0' * 32}-00f067aa0ba902b7-01",
                f"00-{TRACE_ID}-{'0' * 16}-01", TRACEPARENT + "-extra", "00-abc-def-01"):
        headers = call(server, [("traceparent", bad)])
        assert "traceparent" not in headers, bad
        assert headers["x-request-id"] != TRACE_ID and len(headers["x-request-id"]) > 0, bad


def test_the_python_client_sends_trace_metadata(server):
    """RemoteLMHead(metadata=...) sends its pairs with every call, streams included."""
    x = np.zeros((2, 3, 64), np.float32)
    with RemoteLMHead(server.address, shared_memory="off",
                      metadata=[("traceparent", TRACEPARENT)]) as head:
        head.forward(x)
        head.forward_stream(x, micro_batch_size=1)
    assert f"request_id={TRACE_ID} Forward" in server.log()
    assert f"request_id={TRACE_ID} ForwardStream" in server.log()
    with pytest.raises(ValueError, match="metadata: keys"):
        RemoteLMHead(server.address, metadata=[("Trace-Id", "x")])
    with pytest.raises(ValueError, match="auth_token"):
        RemoteLMHead(server.address, metadata=[("authorization", "Bearer x")])
    with RemoteLMHead(server.address, shared_memory="off",
                      metadata=[("x-trace-bin", b"\x00\x01")]) as head:
        head.list_models()  # a binary header goes as bytes
