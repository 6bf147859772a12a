"""The rule that combines micro-batches (docs/API.md, "Combining micro-batches"), in the Python
client: against the shared test vectors that the C++ client is tested against too, and
forward_stream against one forward call of the real server over a grid of the cases where a
careless combination goes wrong (nothing scored, zero, negative, infinite and NaN divisors,
non-finite inputs, empty jobs, both implementations, every reduction, argmax and logits)."""

import json
import math
import re

import grpc
import numpy as np
import pytest
import torch

from lmhead_client import LMHeadError, LMOutputWithLoss, RemoteLMHead
from lmhead_client import _tensors
from lmhead_client._micro_batches import SCORING_FIELDS, MicroBatchCombiner
from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb
from server_process import REPO, ServerProcess

VECTORS = json.loads((REPO / "tests/data/micro_batch_vectors.json").read_text())["cases"]
D, V = 16, 50


def _number(value) -> float:
    return float(value)  # also "nan", "inf" and "-inf"


def _tensor(spec) -> pb.Tensor:
    dtype = getattr(pb, "DATA_TYPE_" + spec["dtype"])
    if dtype == pb.DATA_TYPE_BOOL:
        array = np.array(spec["values"], dtype=np.bool_)
        return pb.Tensor(dtype=dtype, shape=spec["shape"], data=array.tobytes())
    values = [_number(v) for v in spec["values"]]
    if dtype == pb.DATA_TYPE_INT64:
        array = np.array(values, dtype=np.int64)
    elif dtype == pb.DATA_TYPE_BF16:
        array = _tensors.BF16.from_float32(np.array(values, dtype=np.float32)).bits
    else:
        array = np.array(values, dtype=np.float16 if dtype == pb.DATA_TYPE_FP16 else np.float32)
    return pb.Tensor(dtype=dtype, shape=spec["shape"], data=array.tobytes())


def _response(spec) -> pb.ForwardResponse:
    response = pb.ForwardResponse(num_scored_tokens=spec["num_scored_tokens"])
    for name in ("logits", "argmax", "loss", "ce_loss", "z_loss"):
        if name in spec:
            getattr(response, name).CopyFrom(_tensor(spec[name]))
    for name, tensor in spec.get("scoring", {}).items():
        getattr(response.scoring, name).CopyFrom(_tensor(tensor))
    return response


@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
def test_shared_vectors(case):
    divisor = case["loss_div_factor"]
    combiner = MicroBatchCombiner(case["reduction"],
                                  None if divisor is None else _number(divisor),
                                  lambda: case["implementation"])
    for part in case["micro_batches"]:
        combiner.add(_response(part))
    got = combiner.finish()
    want = _response(case["expected"])
    assert combiner.num_scored_tokens == want.num_scored_tokens
    names = {n for n in ("logits", "argmax", "loss", "ce_loss", "z_loss") if want.HasField(n)}
    scored = {n for n in SCORING_FIELDS if want.scoring.HasField(n)}
    assert set(got) == names | scored
    for name in names | scored:
        expected = _tensors.decode(getattr(want.scoring if name in scored else want, name))
        assert got[name].dtype == expected.dtype, name
        assert got[name].array.shape == expected.array.shape, name
        # Bit-exact, NaNs of any payload equal.
        np.testing.assert_array_equal(got[name].array, expected.array, err_msg=name)


@pytest.fixture(scope="module")
def server(server_binary, tmp_path_factory):
    process = ServerProcess([f"--demo_d_model={D}", f"--demo_vocab_size={V}"],
                            tmp_path_factory.mktemp("micro_batches"))
    yield process
    assert process.stop() == 0, process.log()[-2000:]


def _same(streamed, unary, what):
    if isinstance(unary, tuple) and not isinstance(unary, LMOutputWithLoss):
        for a, b in zip(streamed, unary):
            _same(a, b, what)
        return
    if isinstance(unary, torch.Tensor):
        assert streamed.dtype == unary.dtype and streamed.shape == unary.shape, what
        # Equal up to summation order; NaN and infinities exactly where one call has them.
        assert torch.equal(streamed.isnan(), unary.isnan()), (what, streamed, unary)
        assert torch.equal(streamed.isinf(), unary.isinf()), (what, streamed, unary)
        finite = streamed.isfinite()
        torch.testing.assert_close(streamed[finite], unary[finite], rtol=2e-6, atol=1e-6,
                                   msg=lambda m: f"{what}: {m}")
        torch.testing.assert_close(streamed[~finite], unary[~finite], equal_nan=True)
        return
    for name, want in unary._asdict().items():
        have = getattr(streamed, name)
        assert (have is None) == (want is None), (what, name)
        if want is not None:
            _same(have, want, f"{what} {name}")


DIVISORS = [None, 0.0, -0.0, -2.0, 0.5, math.inf, math.nan]


@pytest.mark.parametrize("implementation", ["default", "fused_linear"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("labels_kind", ["some ignored", "all ignored", "none ignored"])
def test_forward_stream_is_one_forward(server, implementation, reduction, labels_kind):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 4, D, generator=gen)
    labels = torch.randint(0, V, (5, 4), generator=gen)
    if labels_kind == "some ignored":
        labels[torch.rand(5, 4, generator=gen) < 0.5] = -100
        labels[1] = -100  # a micro-batch of one row with nothing scored
    elif labels_kind == "all ignored":
        labels[:] = -100
    with RemoteLMHead(server.address, timeout=60) as head:
        for divisor in DIVISORS:
            for z in (None, 1e-3):
                args = dict(labels=labels, loss_reduction=reduction, z_loss_multiplier=z,
                            loss_div_factor=divisor, loss_implementation=implementation,
                            return_argmax=True)
                what = f"{implementation} {reduction} {labels_kind} d={divisor} z={z}"
                unary = head.forward(x, **args)
                for size in (1, 2, 5):
                    _same(head.forward_stream(x, micro_batch_size=size, **args), unary,
                          f"{what} micro_batch_size={size}")


@pytest.mark.parametrize("implementation", ["default", "fused_linear"])
def test_non_finite_inputs_and_empty_jobs(server, implementation):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, D, generator=gen)
    x[1, 0, 0] = math.nan
    x[2, 1, 3] = math.inf
    labels = torch.randint(0, V, (4, 3), generator=gen)
    with RemoteLMHead(server.address, timeout=60) as head:
        for reduction in ("mean", "sum", "none"):
            args = dict(labels=labels, loss_reduction=reduction, z_loss_multiplier=1e-4,
                        loss_implementation=implementation)
            _same(head.forward_stream(x, micro_batch_size=1, **args), head.forward(x, **args),
                  f"non-finite {reduction}")
            _same(head.forward_stream(x, micro_batch_size=3, logits_to_keep=0, **args),
                  head.forward(x, logits_to_keep=0, **args), f"non-finite {reduction}")
        # Logits only, and kept positions dropping every position.
        _same(head.forward_stream(x, micro_batch_size=3), head.forward(x), "logits")
        args = dict(labels=labels, logits_to_keep=-3, loss_implementation=implementation)
        _same(head.forward_stream(x, micro_batch_size=3, **args), head.forward(x, **args),
              "nothing kept")
        # An empty job is one micro-batch.
        for reduction in ("mean", "sum"):
            args = dict(labels=labels[:0], loss_reduction=reduction,
                        loss_implementation=implementation)
            _same(head.forward_stream(x[:0], **args), head.forward(x[:0], **args), "empty")


def test_issue_11_exact_cases(server):
    """fused_linear, every label ignored, mean, over micro-batches of one row: 0.0 as one request
    (and as upstream's fused path), not NaN; sum with loss_div_factor 0 and scored tokens: +inf
    as one request and torch, not NaN."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, D, generator=gen)
    ignored = torch.full((2, 5), -100)
    with RemoteLMHead(server.address, timeout=60) as head:
        args = dict(labels=ignored, loss_implementation="fused_linear")
        unary = head.forward(x, **args)
        streamed = head.forward_stream(x, micro_batch_size=1, **args)
        assert unary.loss.item() == 0.0 and streamed.loss.item() == 0.0
        assert streamed.ce_loss.item() == 0.0
        labels = torch.randint(0, V, (2, 5), generator=gen)
        args = dict(labels=labels, loss_reduction="sum", loss_div_factor=0)
        unary = head.forward(x, **args)
        streamed = head.forward_stream(x, micro_batch_size=1, **args)
        assert unary.loss.item() == math.inf and streamed.loss.item() == math.inf
        assert streamed.ce_loss.item() == math.inf


def test_tensor_divisors(server):
    """A (B, K) divisor with "none" is split with the batch; a tensor with mean/sum is refused
    (the client divides once, by a number); rank 3 would change the losses' shape."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(4, 3, D, generator=gen)
    labels = torch.randint(0, V, (4, 3), generator=gen)
    with RemoteLMHead(server.address, timeout=60) as head:
        for divisor in (torch.rand(4, 3, generator=gen) + 0.5, torch.rand(1, 3) + 0.5,
                        torch.rand(3) + 0.5, torch.tensor(2.0), torch.rand(4, 1) + 0.5):
            args = dict(labels=labels, loss_reduction="none", loss_div_factor=divisor)
            _same(head.forward_stream(x, micro_batch_size=3, **args), head.forward(x, **args),
                  f"divisor {list(divisor.shape)}")
        for reduction in ("mean", "sum"):
            with pytest.raises(ValueError, match="^loss_div_factor: "):
                head.forward_stream(x, labels=labels, loss_reduction=reduction,
                                    loss_div_factor=torch.tensor(2.0), micro_batch_size=2)
        with pytest.raises(ValueError, match="^loss_div_factor: "):
            head.forward_stream(x, labels=labels, loss_reduction="none",
                                loss_div_factor=torch.ones(2, 4, 3), micro_batch_size=2)


def test_not_protobuf_is_invalid_argument_in_calls_and_streams(server):
    garbage = b"\xff\xff\xff\xff\x0f"
    with grpc.insecure_channel(server.address) as channel:
        unary = channel.unary_unary("/lmhead.v1.LMHeadService/Forward")
        with pytest.raises(grpc.RpcError) as error:
            unary(garbage, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(
            "request: not a valid lmhead.v1.ForwardRequest message")
        stream = channel.stream_stream("/lmhead.v1.LMHeadService/ForwardStream")
        with pytest.raises(grpc.RpcError) as error:
            list(stream(iter([garbage]), timeout=10))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith("request: not a valid")
    with RemoteLMHead(server.address, timeout=60) as head:
        assert head.forward(torch.randn(1, 2, D)).shape == (1, 2, V)


def test_errors_name_the_request_field(server):
    """Bad inputs through the Python client: each message starts with our field's path."""
    field_path = re.compile(r"^[a-z_]+(\.[a-z_]+|\[[0-9]+\])*: ")
    x = torch.randn(2, 3, D)
    labels = torch.randint(0, V, (2, 3))
    bad = [
        (dict(labels=labels, loss_reduction="none", loss_div_factor=torch.ones(3, 1)),
         "options.loss_div_factor_tensor: shape [3, 1] does not broadcast"),
        (dict(labels=labels, loss_reduction="none", loss_div_factor=torch.ones(2, 4)),
         "options.loss_div_factor_tensor: shape [2, 4] does not broadcast"),
        (dict(labels=labels + V), "labels: values must lie in"),
        (dict(logits_to_keep=torch.tensor([[0], [3]])), "options.logits_to_keep_positions: "),
        (dict(return_logits=False), "options.return_logits: "),
        (dict(labels=labels, loss_implementation="fused_linear", return_logits=True),
         "options.return_logits: "),
        (dict(logit_tile_bytes=-1, labels=labels), "options.logit_tile_bytes: "),
    ]
    with RemoteLMHead(server.address, timeout=60) as head:
        for args, prefix in bad:
            with pytest.raises(LMHeadError) as error:
                head.forward(x, **args)
            assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT, args
            assert error.value.details.startswith(prefix), error.value.details
            assert field_path.match(error.value.details), error.value.details
        with pytest.raises(LMHeadError) as error:
            head.forward(x[:, :, :8])
        assert error.value.details.startswith("hidden_states.shape: "), error.value.details
    with RemoteLMHead(server.address, model="x" * 70000, timeout=60) as head:
        with pytest.raises(LMHeadError) as error:
            head.forward(x)
        assert error.value.code == grpc.StatusCode.NOT_FOUND
        assert error.value.details.startswith("model: no model named 'xxx")
        assert len(error.value.details) < 200


@pytest.fixture(scope="module")
def unpacked_server(server_binary, tmp_path_factory):
    """Every micro-batch computed alone: answers that do not depend on timing, bit for bit."""
    process = ServerProcess([f"--demo_d_model={D}", f"--demo_vocab_size={V}",
                             "--max_batch_tokens=1"], tmp_path_factory.mktemp("unpacked"))
    yield process
    assert process.stop() == 0, process.log()[-2000:]


def _bitwise_equal(a, b, what):
    if isinstance(b, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        assert torch.equal(a.view(-1).view(torch.uint8) if a.is_floating_point() else a,
                           b.view(-1).view(torch.uint8) if b.is_floating_point() else b), (
            what, a, b)
        return
    if b is None:
        assert a is None, what
        return
    for i, (x, y) in enumerate(zip(a, b)):
        _bitwise_equal(x, y, f"{what}[{i}]")


@pytest.mark.parametrize("implementation", ["default", "fused_linear"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_parallel_streams_give_one_streams_result(unpacked_server, server, implementation,
                                                  reduction):
    """parallel_streams spreads the micro-batches over several streams and connections; the
    answers are combined in the job's order: exactly one stream's result where each micro-batch
    is computed alone, and the same up to float rounding where the server packs them."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(11, 4, D, generator=gen)
    labels = torch.randint(0, V, (11, 4), generator=gen)
    labels[torch.rand(11, 4, generator=gen) < 0.3] = -100
    args = dict(labels=labels, loss_reduction=reduction, z_loss_multiplier=1e-3,
                loss_div_factor=2.0 if reduction != "none" else torch.rand(11, 1) + 0.5,
                loss_implementation=implementation, return_argmax=True,
                logits_to_keep=torch.randint(0, 4, (11, 2), generator=gen))
    with RemoteLMHead(unpacked_server.address, timeout=60) as head:
        one = head.forward_stream(x, micro_batch_size=2, **args)
        for streams in (2, 3, 6, 20):
            before = unpacked_server.log().count("ForwardStream")
            _bitwise_equal(head.forward_stream(x, micro_batch_size=2, parallel_streams=streams,
                                               **args), one, f"{streams} streams")
            # As many calls as asked, at most one a micro-batch (6 of 2 rows here).
            assert unpacked_server.log().count("ForwardStream") - before == min(streams, 6)
    with RemoteLMHead(server.address, timeout=60) as head:
        _same(head.forward_stream(x, micro_batch_size=2, parallel_streams=3, **args), one,
              "3 streams, packing on")


def test_parallel_streams_fail_with_the_first_failure(server):
    """A micro-batch refused in one stream fails the job with its status; the streams after it
    are cancelled; with two refused micro-batches the job always fails with the earlier one,
    numbered in the job as one stream numbers it; the client then works as before."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(8, 4, D, generator=gen)
    with RemoteLMHead(server.address, timeout=60) as head:
        for bad_row in (0, 7):
            labels = torch.randint(0, V, (8, 4), generator=gen)
            labels[bad_row, 1] = V + 3
            with pytest.raises(LMHeadError) as raised:
                head.forward_stream(x, labels=labels, micro_batch_size=1, parallel_streams=4)
            assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "labels" in str(raised.value)
        labels = torch.randint(0, V, (8, 4), generator=gen)
        labels[2, 0], labels[6, 0] = -5, V  # two micro-batches refused, in different streams
        with pytest.raises(LMHeadError) as one_stream:
            head.forward_stream(x, labels=labels, micro_batch_size=1)
        assert one_stream.value.details.endswith("(micro-batch 2)"), one_stream.value
        for _ in range(6):
            with pytest.raises(LMHeadError) as raised:
                head.forward_stream(x, labels=labels, micro_batch_size=1, parallel_streams=4)
            assert raised.value.details == one_stream.value.details
        labels = torch.randint(0, V, (8, 4), generator=gen)
        _same(head.forward_stream(x, labels=labels, micro_batch_size=1, parallel_streams=4),
              head.forward(x, labels=labels), "after a failure")
        for bad in (0, -1, 2.5, True, "2"):
            with pytest.raises(ValueError, match="parallel_streams"):
                head.forward_stream(x, labels=labels, parallel_streams=bad)
        with pytest.raises(ValueError, match="loss_reduction"):
            head.forward_stream(x, labels=labels, loss_reduction="Mean")
