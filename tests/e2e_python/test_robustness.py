"""Random malformed requests against the real server: every one is answered with a status that
is not INTERNAL or UNKNOWN, the server never dies, and it still answers a good request. Seeded
and bounded (a few hundred requests, seconds); complements the exact bad-input matrix of
tests/e2e/server_e2e_test.cc with inputs nobody thought of."""

import os
import random
import re
import time

import grpc
import numpy as np
import pytest

from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb
from lmhead_client._proto.lmhead.v1 import lmhead_pb2_grpc as pb_grpc
from server_process import ServerProcess

D, V = 16, 50
# What every error message starts with: a field path of the request ("hidden_states.shape[1]: ",
# "options.loss_div_factor_tensor: ", "request: " for a message that is not protobuf).
FIELD_PATH = re.compile(r"^[a-z_]+(\.[a-z_]+|\[[0-9]+\])*: ")

ACCEPTED_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}


def random_tensor(rng: random.Random, good_shape, good_dtype):
    """A tensor that is right, or wrong in one or more random ways."""
    shape = list(good_shape)
    dtype = good_dtype
    if rng.random() < 0.3:
        shape = [rng.choice([-1, 0, 1, 2, 3, D, V, 2**31, 2**62]) for _ in range(rng.randint(0, 5))]
    if rng.random() < 0.2:
        dtype = rng.choice(list(pb.DataType.values()) + [7, 99, -1])
    numel = int(np.prod([max(s, 0) for s in shape], dtype=np.float64)) if shape else 1
    itemsize = {pb.DATA_TYPE_BF16: 2, pb.DATA_TYPE_FP16: 2, pb.DATA_TYPE_FP32: 4,
                pb.DATA_TYPE_INT32: 4, pb.DATA_TYPE_INT64: 8}.get(dtype, 4)
    nbytes = numel * itemsize if numel * itemsize < (1 << 20) else rng.randint(0, 4096)
    if rng.random() < 0.2:
        nbytes = max(0, nbytes + rng.choice([-3, -1, 1, 7]))
    if dtype in (pb.DATA_TYPE_INT32, pb.DATA_TYPE_INT64) and rng.random() < 0.7:
        values = np.array([rng.choice([-100, -5, 0, 3, V - 1, V, 2**40]) for _ in range(nbytes // itemsize)])
        data = values.astype("<i8" if itemsize == 8 else "<i4").tobytes()[:nbytes]
    else:
        data = bytes(rng.getrandbits(8) for _ in range(nbytes))
    tensor = pb.Tensor(dtype=dtype, data=data)
    tensor.shape.extend(shape)
    return tensor


def random_request(rng: random.Random) -> pb.ForwardRequest:
    B, S = rng.randint(0, 3), rng.randint(0, 5)
    request = pb.ForwardRequest(model=rng.choice(["", "", "", "nope"]))
    request.hidden_states.CopyFrom(random_tensor(rng, [B, S, D], pb.DATA_TYPE_FP32))
    if rng.random() < 0.7:
        request.labels.CopyFrom(random_tensor(rng, [B, S], pb.DATA_TYPE_INT64))
    options = request.options
    if rng.random() < 0.5:
        options.loss_reduction = rng.choice([0, 1, 2, 3, 4, 77])
    if rng.random() < 0.3:
        options.z_loss_multiplier = rng.choice([0.0, 1e-4, -1.0, float("nan"), float("inf")])
    if rng.random() < 0.3:
        options.ignore_index = rng.choice([-100, 0, V, -(2**63)])
    if rng.random() < 0.3:
        options.return_logits = rng.random() < 0.5
    choice = rng.random()
    if choice < 0.2:
        options.logits_to_keep_count = rng.choice([0, 1, -1, 5, -(2**63), 2**63 - 1])
    elif choice < 0.35:
        options.logits_to_keep_positions.CopyFrom(random_tensor(rng, [B, 2], pb.DATA_TYPE_INT64))
    choice = rng.random()
    if choice < 0.2:
        options.loss_div_factor_value = rng.choice([0.0, 2.0, -1.0, float("nan")])
    elif choice < 0.3:
        options.loss_div_factor_tensor.CopyFrom(random_tensor(rng, [B, 1], pb.DATA_TYPE_FP32))
    if rng.random() < 0.2:
        # Either name of the tile budget (fused_chunk_bytes is the deprecated one), or both.
        for name in rng.choice([("logit_tile_bytes",), ("fused_chunk_bytes",),
                                ("logit_tile_bytes", "fused_chunk_bytes")]):
            setattr(options, name, rng.choice([-1, 0, 1, 1 << 40]))
    if rng.random() < 0.2:
        options.logits_dtype = rng.choice([0, 1, 2, 3, 4, 5, 42])
    config = request.config
    if rng.random() < 0.3:
        config.loss_implementation = rng.choice([0, 1, 2, 9])
    if rng.random() < 0.2:
        config.dtype = rng.choice([0, 1, 2, 3, 4, 5, 13])
    if rng.random() < 0.15:
        config.name = rng.choice([0, 1, 2, 5])
    if rng.random() < 0.15:
        config.layer_norm.name = rng.choice([0, 1, 2, 6, 8])
    if rng.random() < 0.1:
        config.bias = rng.random() < 0.5
    return request


@pytest.fixture(scope="module")
def server(server_binary, tmp_path_factory):
    process = ServerProcess([f"--demo_d_model={D}", f"--demo_vocab_size={V}"],
                            tmp_path_factory.mktemp("robustness"))
    yield process
    assert process.stop() == 0, process.log()[-2000:]


def test_random_malformed_requests_get_clear_errors(server):
    rng = random.Random(int(os.environ.get("LMHEAD_ROBUSTNESS_SEED", "1234")))
    good = pb.ForwardRequest()
    x = np.random.default_rng(0).standard_normal((2, 3, D), dtype=np.float32)
    good.hidden_states.CopyFrom(pb.Tensor(dtype=pb.DATA_TYPE_FP32, shape=x.shape, data=x.tobytes()))
    codes = {}
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LMHeadServiceStub(channel)
        for i in range(int(os.environ.get("LMHEAD_ROBUSTNESS_REQUESTS", "400"))):
            request = random_request(rng)
            try:
                stub.Forward(request, timeout=30)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as error:
                code = error.code()
                codes[code.name] = codes.get(code.name, 0) + 1
                assert code in ACCEPTED_ERRORS, (i, code, error.details(), request)
                # Every message is ours and starts with the field at fault (issue 11).
                assert FIELD_PATH.match(error.details()), (i, code, error.details(), request)
        # Still serving, and still right.
        response = stub.Forward(good, timeout=30)
        assert list(response.logits.shape) == [2, 3, V]
    print("random requests by status:", codes)
    assert codes.get("INVALID_ARGUMENT", 0) > 100  # the generator really produces bad input


def test_random_malformed_streams_end_cleanly(server):
    """Streams of random micro-batches: each stream ends with OK or a clear error status, and
    the server keeps serving."""
    rng = random.Random(int(os.environ.get("LMHEAD_ROBUSTNESS_SEED", "1234")) + 1)
    codes = {}
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LMHeadServiceStub(channel)
        for i in range(60):
            requests = [random_request(rng) for _ in range(rng.randint(1, 5))]
            try:
                for _ in stub.ForwardStream(iter(requests), timeout=30):
                    pass
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as error:
                code = error.code()
                codes[code.name] = codes.get(code.name, 0) + 1
                assert code in ACCEPTED_ERRORS, (i, code, error.details())
                assert FIELD_PATH.match(error.details()), (i, error.details())
                assert "micro-batch" in error.details(), (i, error.details())
        assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    print("random streams by status:", codes)


def test_deadline_stops_a_long_fused_forward_between_tiles(server_binary, tmp_path):
    """A CPU forward that takes seconds stops at its deadline (checked between fused_linear's tiles)
    instead of running on after the client has given up."""
    process = ServerProcess(["--demo_d_model=1024", "--demo_vocab_size=50304"], tmp_path)
    try:
        x = np.random.default_rng(0).standard_normal((1, 2048, 1024), dtype=np.float32)
        labels = np.random.default_rng(1).integers(0, 50304, size=(1, 2048))
        request = pb.ForwardRequest(
            hidden_states=pb.Tensor(dtype=pb.DATA_TYPE_FP32, shape=x.shape, data=x.tobytes()),
            labels=pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=labels.shape, data=labels.tobytes()))
        request.config.loss_implementation = pb.LOSS_IMPLEMENTATION_FUSED_LINEAR
        request.options.logit_tile_bytes = 8 << 20  # many small tiles
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.LMHeadServiceStub(channel)
            start = time.monotonic()
            stub.Forward(request, timeout=60)  # warm-up, and the full time
            full = time.monotonic() - start
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as error:
                stub.Forward(request, timeout=full / 5)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The server's own outcome for that call: DEADLINE_EXCEEDED, logged long before
            # the forward could have finished.
            while "DEADLINE_EXCEEDED" not in process.log() and time.monotonic() - start < 3 * full:
                time.sleep(0.02)
            stopped_after = time.monotonic() - start
        assert "DEADLINE_EXCEEDED" in process.log(), process.log()[-2000:]
        assert stopped_after < 0.7 * full, (full, stopped_after)
    finally:
        assert process.stop() == 0, process.log()[-2000:]
