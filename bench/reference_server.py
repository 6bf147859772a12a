"""The server a user would write instead of lmhead: Python grpcio around OLMo-core's own `LMHead`,
serving lmhead.v1's `Forward` and `ForwardStream` with PyTorch ops (issue 13's baseline).

It loads a model the way `lmhead_server --model NAME=PATH.safetensors` does (the weights in
OLMo-core's state-dict names, the head's configuration in `PATH.json` beside them, lmhead's JSON:
docs/API.md), decodes each request's tensors with `torch.frombuffer`, calls `LMHead.forward` with
its options and encodes the outputs; no queue, no batching, no staging, one call per gRPC worker
thread; gRPC's health service. What it does not support (per-request configuration other than
`loss_implementation`, `logits_dtype`, `logit_tile_bytes` (or its deprecated name
`fused_chunk_bytes`), `return_argmax`) is answered
UNIMPLEMENTED; what OLMo-core or PyTorch refuses (hidden states in another dtype than the head's,
int32 labels), INVALID_ARGUMENT with its message; it checks no more than they do (it takes
rank-2 hidden states, for one). GetModel names the model and its sizes only.

    PYTHONPATH=client/python $(tools/venv.sh path)/bin/python bench/reference_server.py \\
        --model demo=/path/head.safetensors --device cuda:0 --port 50052

`fused_linear` runs OLMo-core's Liger path, which needs a GPU and the liger-kernel package.
"""

import argparse
import copy
import json
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from olmo_core.config import DType
from olmo_core.nn.layer_norm import LayerNormConfig, LayerNormType
from olmo_core.nn.lm_head import LMHeadConfig, LMHeadType, LMLossImplementation
from safetensors.torch import load_file

from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb
from lmhead_client._proto.lmhead.v1 import lmhead_pb2_grpc as pb_grpc

_TORCH_OF_WIRE = {
    pb.DATA_TYPE_BF16: torch.bfloat16,
    pb.DATA_TYPE_FP16: torch.float16,
    pb.DATA_TYPE_FP32: torch.float32,
    pb.DATA_TYPE_INT32: torch.int32,
    pb.DATA_TYPE_INT64: torch.int64,
}
_WIRE_OF_TORCH = {v: k for k, v in _TORCH_OF_WIRE.items()}
_REDUCTIONS = {
    pb.LOSS_REDUCTION_UNSPECIFIED: "mean",
    pb.LOSS_REDUCTION_MEAN: "mean",
    pb.LOSS_REDUCTION_SUM: "sum",
    pb.LOSS_REDUCTION_NONE: "none",
}
_IMPLEMENTATIONS = {
    pb.LOSS_IMPLEMENTATION_DEFAULT: LMLossImplementation.default,
    pb.LOSS_IMPLEMENTATION_FUSED_LINEAR: LMLossImplementation.fused_linear,
}


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def decode(tensor: pb.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.dtype not in _TORCH_OF_WIRE:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported dtype {tensor.dtype}")
    dtype = _TORCH_OF_WIRE[tensor.dtype]
    if not tensor.data:
        return torch.empty(tuple(tensor.shape), dtype=dtype, device=device)
    values = torch.frombuffer(bytearray(tensor.data), dtype=dtype)
    return values.reshape(tuple(tensor.shape)).to(device)


def encode(value: torch.Tensor) -> pb.Tensor:
    value = value.detach().contiguous().cpu()
    raw = value.view(torch.int16) if value.dtype == torch.bfloat16 else value
    return pb.Tensor(dtype=_WIRE_OF_TORCH[value.dtype], shape=list(value.shape),
                     data=raw.numpy().tobytes())


def olmo_config(config: dict) -> LMHeadConfig:
    """lmhead's head configuration JSON (docs/API.md) as OLMo-core's LMHeadConfig."""
    layer_norm = None
    if config.get("layer_norm"):
        options = dict(config["layer_norm"])
        name = options.pop("name")
        if "dtype" in options:
            options["dtype"] = DType(options["dtype"])
        layer_norm = LayerNormConfig(name=LayerNormType(name), **options)
    return LMHeadConfig(
        name=LMHeadType(config.get("name", "default")),
        layer_norm=layer_norm,
        bias=config.get("bias"),
        dtype=DType(config.get("dtype", "float32")),
        loss_implementation=LMLossImplementation(config.get("loss_implementation", "default")),
    )


class Model:
    def __init__(self, name: str, weights: Path, device: torch.device):
        self.name = name
        self.device = device
        config = json.loads(weights.with_suffix(".json").read_text())
        state = load_file(str(weights))
        vocab_size, d_model = state["w_out.weight"].shape
        self.head = olmo_config(config).build(d_model=d_model, vocab_size=vocab_size,
                                              init_device=str(device))
        self.head.load_state_dict(state)
        self.head.eval()
        # The same parameters under the other loss implementation (a shallow copy shares them).
        self.heads = {}
        for implementation in LMLossImplementation:
            head = copy.copy(self.head)
            head._loss_implementation = implementation
            self.heads[implementation] = head

    def forward(self, request: pb.ForwardRequest) -> pb.ForwardResponse:
        config = request.config
        if (config.name or config.HasField("layer_norm") or config.HasField("bias")
                or config.dtype):
            raise Refused(grpc.StatusCode.UNIMPLEMENTED, "per-request configuration")
        o = request.options
        if (o.logits_dtype or o.HasField("logit_tile_bytes") or o.HasField("fused_chunk_bytes")
                or o.return_argmax):
            raise Refused(grpc.StatusCode.UNIMPLEMENTED,
                          "logits_dtype, logit_tile_bytes, return_argmax")
        head = self.head
        if config.loss_implementation:
            head = self.heads[_IMPLEMENTATIONS[config.loss_implementation]]
        x = decode(request.hidden_states, self.device)
        labels = decode(request.labels, self.device) if request.HasField("labels") else None
        kwargs = {"labels": labels, "loss_reduction": _REDUCTIONS[o.loss_reduction]}
        if o.HasField("ignore_index"):
            kwargs["ignore_index"] = o.ignore_index
        if o.HasField("z_loss_multiplier"):
            kwargs["z_loss_multiplier"] = o.z_loss_multiplier
        if o.HasField("return_logits"):
            kwargs["return_logits"] = o.return_logits
        which = o.WhichOneof("loss_div_factor")
        if which == "loss_div_factor_value":
            kwargs["loss_div_factor"] = o.loss_div_factor_value
        elif which == "loss_div_factor_tensor":
            kwargs["loss_div_factor"] = decode(o.loss_div_factor_tensor, self.device)
        which = o.WhichOneof("logits_to_keep")
        if which == "logits_to_keep_count":
            kwargs["logits_to_keep"] = o.logits_to_keep_count
        elif which == "logits_to_keep_positions":
            kwargs["logits_to_keep"] = decode(o.logits_to_keep_positions, self.device)
        try:
            with torch.inference_mode():
                out = head(x, **kwargs)
        except (RuntimeError, ValueError, IndexError) as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        response = pb.ForwardResponse(model=self.name)
        if isinstance(out, torch.Tensor):
            response.logits.CopyFrom(encode(out))
            return response
        for field in ("logits", "loss", "ce_loss", "z_loss"):
            value = getattr(out, field)
            if value is not None:
                getattr(response, field).CopyFrom(encode(value))
        keep = kwargs.get("logits_to_keep", 0)
        kept = labels
        if isinstance(keep, torch.Tensor):
            kept = labels.gather(1, keep)
        elif keep:
            kept = labels[:, -keep:]
        response.num_scored_tokens = int((kept != kwargs.get("ignore_index", -100)).sum())
        return response


class Service(pb_grpc.LMHeadServiceServicer):
    def __init__(self, models):
        self.models = {model.name: model for model in models}
        self.default = models[0].name

    def _answer(self, request, context):
        model = self.models.get(request.model or self.default)
        if model is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model named {request.model!r}")
        try:
            return model.forward(request)
        except Refused as e:
            context.abort(e.code, str(e))

    def Forward(self, request, context):
        return self._answer(request, context)

    def ForwardStream(self, request_iterator, context):
        for request in request_iterator:
            yield self._answer(request, context)

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[self.GetModel(pb.GetModelRequest(name=name), context)
                                             for name in self.models])

    def GetModel(self, request, context):
        model = self.models.get(request.name or self.default)
        if model is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model named {request.name!r}")
        return pb.ModelInfo(name=model.name, d_model=model.head.w_out.in_features,
                            vocab_size=model.head.w_out.out_features)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="a model: OLMo-core state dict in PATH (.safetensors), its lmhead "
                             "head configuration JSON beside it (repeatable; the first is the "
                             "default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50052, help="0 picks a free port")
    parser.add_argument("--port_file", type=Path, help="write the bound port there")
    parser.add_argument("--workers", type=int, default=16, help="gRPC worker threads")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    models = []
    for spec in args.model:
        name, _, path = spec.partition("=")
        weights = Path(path)
        for needed in (weights, weights.with_suffix(".json")):
            if not needed.is_file():
                parser.error(f"--model {spec}: no file {needed} (the weights and, beside them, "
                             "the head's JSON; tests/e2e_python/test_reference_server.py makes "
                             "a pair)")
        models.append(Model(name, weights, device))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), options=[
        ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    pb_grpc.add_LMHeadServiceServicer_to_server(Service(models), server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    if args.port_file:
        args.port_file.write_text(f"{port}\n")
    print(f"reference server on {args.host}:{port}, models {[m.name for m in models]}",
          file=sys.stderr, flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
