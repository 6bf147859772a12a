"""The service through the Python client and standard gRPC clients, against the real server:
reflection, health, models, streamed forward == unary forward, errors and dtypes."""

import json
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)
from safetensors.torch import save_file

from lmhead_client import BF16, LMHeadError, LMOutputWithLoss, RemoteLMHead
from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb
from lmhead_client._proto.lmhead.v1 import lmhead_pb2_grpc as pb_grpc
from olmo_core.config import DType
from olmo_core.nn.layer_norm import LayerNormConfig, LayerNormType
from olmo_core.nn.lm_head import LMHeadConfig, LMLossImplementation
from parity_cases import TOLERANCES
from server_process import ServerProcess

D, V = 32, 97
# name -> (olmo_core config, our config JSON); the first is the server's default model.
MODELS = {
    "rms_fp32": (
        LMHeadConfig(layer_norm=LayerNormConfig(name=LayerNormType.rms, bias=False), bias=False),
        {"name": "default", "layer_norm": {"name": "rms", "bias": False}, "bias": False},
    ),
    "fused_bf16": (
        LMHeadConfig(layer_norm=LayerNormConfig(name=LayerNormType.default), dtype=DType.bfloat16,
                     loss_implementation=LMLossImplementation.fused_linear),
        {"name": "default", "layer_norm": {"name": "default"}, "dtype": "bfloat16",
         "loss_implementation": "fused_linear"},
    ),
}


@pytest.fixture(scope="module")
def server(server_binary, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("service")
    args = []
    for seed, (name, (config, config_json)) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        head = config.build(d_model=D, vocab_size=V)
        path = tmp / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
        path.with_suffix(".json").write_text(json.dumps(config_json))
        args.append(f"--model={name}={path}")
    process = ServerProcess(args, tmp / "server")
    yield process
    assert process.stop() == 0, process.log()[-2000:]


def inputs(B=6, S=7, seed=0, ignored=0.3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, D, generator=gen)
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[torch.rand(B, S, generator=gen) < ignored] = -100
    return x, labels


def assert_same(streamed, unary, model="rms_fp32"):
    """Equal up to float summation order, with the parity suite's tolerances for the head's
    dtype (fused_linear's ce_loss = loss - z_loss inherits the bf16 rounding of z_loss). bf16
    logits computed in differently shaped GEMMs (calls packed with others) may differ by one
    rounding unit of the row's scale, so a logit near 0 is compared at that scale."""
    bf16 = model == "fused_bf16"
    rtol, atol = TOLERANCES["bfloat16" if bf16 else "float32"]

    def close(have, want, name):
        scale = atol
        if bf16 and name == "logits" and want.numel():
            scale = max(atol, rtol * float(want.float().nan_to_num(0, 0, 0).abs().max()))
        torch.testing.assert_close(have, want, rtol=rtol, atol=scale, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")

    if isinstance(unary, torch.Tensor):
        close(streamed, unary, "logits")
        return
    assert type(streamed) is LMOutputWithLoss
    for name, want in unary._asdict().items():
        have = getattr(streamed, name)
        assert (have is None) == (want is None), name
        if want is not None:
            close(have, want, name)


# -- Reflection and health -------------------------------------------------------------------


def test_reflection_lists_services(server):
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"lmhead.v1.LMHeadService", "grpc.health.v1.Health"} <= services, services
        methods = {m.name for m in database.FindFileContainingSymbol(
            "lmhead.v1.LMHeadService").service[0].method}
        assert methods == {"Forward", "ForwardStream", "ListModels", "GetModel", "SharedMemory"}


def test_health_serving(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lmhead.v1.LMHeadService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with RemoteLMHead(server.address, timeout=10) as head:
        assert head.health() == "SERVING"
        assert head.health("lmhead.v1.LMHeadService") == "SERVING"


# -- Models ----------------------------------------------------------------------------------


def test_list_and_get_models(server):
    with RemoteLMHead(server.address, timeout=10) as head:
        models = head.list_models()
        assert [m.name for m in models] == sorted(MODELS)
        assert head.get_model().name == "rms_fp32"  # the first --model is the default
        info = head.get_model("fused_bf16")
        assert (info.d_model, info.vocab_size, info.dtype) == (D, V, pb.DATA_TYPE_BF16)
        assert info.config.loss_implementation == pb.LOSS_IMPLEMENTATION_FUSED_LINEAR
        with pytest.raises(LMHeadError) as error:
            head.get_model("nope")
        assert error.value.code == grpc.StatusCode.NOT_FOUND


# -- Streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("micro_batch_size", [1, 4])
def test_forward_stream_equals_forward(server, model, reduction, micro_batch_size):
    x, labels = inputs()
    gen = torch.Generator().manual_seed(1)
    keep = torch.randint(0, x.shape[1], (x.shape[0], 4), generator=gen)
    div = 0.5 + torch.rand(x.shape[0], 1, generator=gen) if reduction == "none" else 3.0
    args = dict(labels=labels, loss_reduction=reduction, z_loss_multiplier=1e-3,
                loss_div_factor=div, logits_to_keep=keep)
    with RemoteLMHead(server.address, model=model, timeout=60) as head:
        unary = head.forward(x, **args)
        streamed = head.forward_stream(x, micro_batch_size=micro_batch_size, **args)
        parts = list(head.iter_forward_stream(x, micro_batch_size=micro_batch_size, **args))
    assert_same(streamed, unary, model)
    rows = list(range(0, x.shape[0], micro_batch_size))
    assert [(c.start, c.stop) for c in parts] == [(a, min(a + micro_batch_size, 6)) for a in rows]
    assert sum(c.num_scored_tokens for c in parts) == int((labels.gather(1, keep) != -100).sum())


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("implementation", ["default", "fused_linear"])
def test_return_argmax_picks_the_largest_logit(server, model, implementation):
    """return_argmax pairs the output with logits.argmax(-1), in a call and over a stream."""
    x, labels = inputs()
    args = dict(labels=labels, loss_implementation=implementation, logits_to_keep=-2,
                return_argmax=True)
    with RemoteLMHead(server.address, model=model, timeout=60) as head:
        logits = head.forward(x)[:, 2:]
        output, argmax = head.forward(x, **args)
        streamed_output, streamed_argmax = head.forward_stream(x, micro_batch_size=4, **args)
        logits_too, argmax_without_labels = head.forward(x, return_argmax=True)
        micro_batches = list(head.iter_forward_stream(x, micro_batch_size=4, **args))
    assert type(output) is LMOutputWithLoss
    assert argmax.dtype == torch.int64 and argmax.shape == logits.shape[:2]

    def assert_picks_the_largest(ids):
        # Calls computed apart, or packed with others (a stream's micro-batches may share a
        # forward), round their logits alike only up to one unit: a near-tie may go either way,
        # so the pick must reach the maximum up to one rounding unit.
        picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(picked, logits.max(-1).values, rtol=1.6e-2, atol=1e-5)

    assert_picks_the_largest(argmax)
    assert_picks_the_largest(streamed_argmax)
    assert_picks_the_largest(torch.cat([c.output[1] for c in micro_batches]))
    assert_same(streamed_output, output, model)
    assert torch.equal(argmax_without_labels, logits_too.argmax(-1))


def test_finished_streams_end_ok_on_the_server(server):
    """The client waits for a stream's status instead of cancelling it once the last answer is
    in: the server logs each as completed."""
    x, labels = inputs()
    before = server.log().count("cancelled")
    with RemoteLMHead(server.address, timeout=60) as head:
        for _ in range(3):
            head.forward_stream(x, labels=labels, micro_batch_size=2, parallel_streams=1)
        list(head.iter_forward_stream(x, labels=labels, micro_batch_size=3))
    deadline = time.time() + 5
    while server.log().count("ForwardStream 3 micro-batches ok") < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert server.log().count("ForwardStream 3 micro-batches ok") >= 3, server.log()[-2000:]
    assert server.log().count("ForwardStream 2 micro-batches ok") >= 1, server.log()[-2000:]
    assert server.log().count("cancelled") == before, server.log()[-2000:]


@pytest.mark.parametrize("model", list(MODELS))
def test_forward_stream_mean_with_nothing_scored(server, model):
    """upstream: NaN from the default implementation, 0 from fused_linear."""
    x, labels = inputs(ignored=1.0)
    with RemoteLMHead(server.address, model=model, timeout=60) as head:
        unary = head.forward(x, labels=labels, z_loss_multiplier=1e-3)
        streamed = head.forward_stream(x, labels=labels, z_loss_multiplier=1e-3,
                                       micro_batch_size=2)
    assert_same(streamed, unary, model)
    assert unary.loss.isnan().item() == (model == "rms_fp32")


def test_forward_stream_logits_numpy_and_byte_budget(server):
    x, _ = inputs(B=5)
    with RemoteLMHead(server.address, timeout=60) as head:
        unary = head.forward(x.numpy())
        # 2 rows of 7 x 32 fp32 per micro-batch.
        micro_batches = list(head.iter_forward_stream(x.numpy(),
                                                      max_micro_batch_bytes=2 * 7 * D * 4))
        streamed = head.forward_stream(x.numpy(), max_micro_batch_bytes=2 * 7 * D * 4)
    assert isinstance(unary, np.ndarray) and isinstance(streamed, np.ndarray)
    assert [(c.start, c.stop) for c in micro_batches] == [(0, 2), (2, 4), (4, 5)]
    np.testing.assert_allclose(streamed, unary, rtol=1.3e-6, atol=1e-5)


def test_old_names_still_work_with_a_deprecation_warning(server):
    """max_chunk_bytes= (now max_micro_batch_bytes=) and StreamChunk (now StreamMicroBatch) work
    for one more release, each with a DeprecationWarning; both keywords at once are a
    TypeError."""
    import lmhead_client
    from lmhead_client import StreamMicroBatch, client

    x, labels = inputs(B=5)
    budget = 2 * 7 * D * 4  # 2 rows per micro-batch
    with RemoteLMHead(server.address, timeout=60) as head:
        want = head.forward_stream(x, labels=labels, max_micro_batch_bytes=budget)
        with pytest.warns(DeprecationWarning, match=r"forward_stream\(\): max_chunk_bytes= is "
                          r"deprecated, use max_micro_batch_bytes="):
            old = head.forward_stream(x, labels=labels, max_chunk_bytes=budget)
        assert_same(old, want, "rms_fp32")
        with pytest.warns(DeprecationWarning, match="iter_forward_stream"):
            bounds = [(c.start, c.stop)
                      for c in head.iter_forward_stream(x, max_chunk_bytes=budget)]
        assert bounds == [(0, 2), (2, 4), (4, 5)]
        with pytest.warns(DeprecationWarning, match="score_stream"):
            scores = head.score_stream(x, labels, label_logprobs=True, max_chunk_bytes=budget)
        assert scores.label_logprobs.shape == (5, 7)
        for call in (lambda: head.forward_stream(x, max_chunk_bytes=budget,
                                                 max_micro_batch_bytes=budget),
                     lambda: list(head.iter_forward_stream(x, max_chunk_bytes=budget,
                                                           max_micro_batch_bytes=budget)),
                     lambda: head.score_stream(x, labels, label_logprobs=True,
                                               max_chunk_bytes=budget,
                                               max_micro_batch_bytes=budget)):
            with pytest.raises(TypeError, match="got both max_micro_batch_bytes= and its "
                               "deprecated name max_chunk_bytes="):
                call()
    for module in (lmhead_client, client):
        with pytest.warns(DeprecationWarning, match=r"StreamChunk is deprecated, use "
                          r"StreamMicroBatch"):
            assert module.StreamChunk is StreamMicroBatch
        with pytest.raises(AttributeError):
            module.NoSuchName  # noqa: B018


def test_the_tile_budget_by_its_deprecated_name(server):
    """options.fused_chunk_bytes (field 10, deprecated) is still read as logit_tile_bytes, with a
    warning in the server's log, and refused when both differ; the client's fused_chunk_bytes=
    keyword still works with a DeprecationWarning (TypeError with logit_tile_bytes= too)."""
    x, labels = inputs()
    args = dict(labels=labels, loss_reduction="none")
    tile = 2 * V * 4  # two tokens of fp32 logits: several tiles
    with RemoteLMHead(server.address, model="fused_bf16", timeout=60) as head:
        want = head.forward(x, logit_tile_bytes=tile, **args)
        with pytest.warns(DeprecationWarning, match=r"forward\(\): fused_chunk_bytes= is "
                          r"deprecated, use logit_tile_bytes="):
            old = head.forward(x, fused_chunk_bytes=tile, **args)
        assert_same(old, want, "fused_bf16")
        for method in ("score", "score_stream"):
            with pytest.warns(DeprecationWarning, match=method):
                getattr(head, method)(x, labels, entropy=True, fused_chunk_bytes=tile)
        with pytest.warns(DeprecationWarning, match="forward_stream"):
            head.forward_stream(x, fused_chunk_bytes=tile, micro_batch_size=4, **args)
        with pytest.raises(TypeError, match="got both logit_tile_bytes= and its deprecated name "
                           "fused_chunk_bytes="):
            head.forward(x, fused_chunk_bytes=tile, logit_tile_bytes=tile, **args)
        with pytest.raises(TypeError, match="unexpected keyword argument 'chunk_bytes'"):
            head.forward(x, chunk_bytes=tile)

    hidden = pb.Tensor(dtype=pb.DATA_TYPE_FP32, shape=x.shape, data=x.numpy().tobytes())
    label_tensor = pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=labels.shape,
                             data=labels.numpy().tobytes())
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LMHeadServiceStub(channel)

        def forward(**options):
            request = pb.ForwardRequest(model="fused_bf16", hidden_states=hidden,
                                        labels=label_tensor)
            for name, value in options.items():
                setattr(request.options, name, value)
            return stub.Forward(request, timeout=60)

        new, old = forward(logit_tile_bytes=tile), forward(fused_chunk_bytes=tile)
        assert old.loss == new.loss and old.num_scored_tokens == new.num_scored_tokens
        assert forward(logit_tile_bytes=tile, fused_chunk_bytes=tile).loss == new.loss
        with pytest.raises(grpc.RpcError) as error:
            forward(logit_tile_bytes=tile, fused_chunk_bytes=2 * tile)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details() == (
            f"options.logit_tile_bytes: {tile} disagrees with options.fused_chunk_bytes, its "
            f"deprecated name, {2 * tile}; send logit_tile_bytes alone")
        with pytest.raises(grpc.RpcError) as error:
            forward(fused_chunk_bytes=-1)
        assert error.value.details() == ("options.fused_chunk_bytes: expected a positive byte "
                                         "count (or 0 for the default), got -1")
    # Logged once per process, however many calls used the old name.
    assert server.log().count("options.fused_chunk_bytes, deprecated") == 1


def test_forward_stream_refuses_what_cannot_be_split(server):
    x, labels = inputs()
    with RemoteLMHead(server.address, timeout=60) as head:
        with pytest.raises(ValueError, match="loss_div_factor: a tensor divisor cannot be applied"):
            head.forward_stream(x, labels=labels, loss_reduction="sum",
                                loss_div_factor=torch.ones(6, 1), micro_batch_size=2)


def test_stream_error_names_the_micro_batch(server):
    x, labels = inputs()
    labels[3, 0] = V  # out of range, in the second micro-batch of 2 rows
    with RemoteLMHead(server.address, timeout=60) as head:
        with pytest.raises(LMHeadError) as error:
            head.forward_stream(x, labels=labels, micro_batch_size=2)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "micro-batch 1" in error.value.details, error.value.details


# -- Errors and dtypes -----------------------------------------------------------------------


def test_errors_carry_the_status_code(server):
    x, labels = inputs()
    with RemoteLMHead(server.address, timeout=60) as head:
        with pytest.raises(LMHeadError) as error:
            head.forward(x[:, :, :16])
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "d_model" in error.value.details
        with pytest.raises(LMHeadError) as error:
            head.forward(x, return_logits=False)
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(TypeError, match="float64"):
            head.forward(x.double())
    with RemoteLMHead(server.address, model="nope", timeout=60) as head:
        with pytest.raises(LMHeadError) as error:
            head.forward(x)
        assert error.value.code == grpc.StatusCode.NOT_FOUND
    with RemoteLMHead(server.address, model="fused_bf16", timeout=60) as head:
        with pytest.raises(LMHeadError) as error:
            head.forward(x.bfloat16(), labels=labels, return_logits=True)
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_enum_value_is_invalid_argument(server):
    """Values the client cannot produce, sent with the raw stub."""
    x, _ = inputs()
    request = pb.ForwardRequest(hidden_states=pb.Tensor(
        dtype=pb.DATA_TYPE_FP32, shape=list(x.shape), data=x.numpy().tobytes()))
    request.options.loss_reduction = 99
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.LMHeadServiceStub(channel).Forward(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "loss_reduction" in error.value.details()


def test_bf16_from_torch_and_from_raw_bits(server):
    x, labels = inputs()
    x16 = x.bfloat16()
    bits = BF16(x16.view(torch.int16).numpy())
    with RemoteLMHead(server.address, model="fused_bf16", timeout=60) as head:
        from_torch = head.forward(x16, labels=labels, loss_implementation="default",
                                  logits_dtype="bf16")
        from_bits = head.forward(bits, labels=labels.numpy(), loss_implementation="default",
                                 logits_dtype="bf16")
    assert from_torch.logits.dtype == torch.bfloat16
    assert from_bits.logits.dtype == np.float32  # numpy has no bfloat16: widened exactly
    assert torch.equal(from_torch.logits.float(), torch.from_numpy(from_bits.logits))
    assert from_torch.loss.item() == from_bits.loss.item()
