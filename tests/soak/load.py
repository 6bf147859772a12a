"""The soak's client side (tests/soak/harness.py runs it): requests with their exact expected
outcomes, the bounded loops that worker processes run against the server, and the victim
processes that the soak kills with SIGKILL in the middle of a call.

Valid calls go through the Python client (`lmhead_client.RemoteLMHead`); malformed ones are
built as protobuf messages, or raw bytes, and sent with grpcio directly. Every call has a
deadline, every loop a bound on its count and its time. Randomness is seeded per worker.

Outcomes are compared exactly, as docs/API.md states them: the status code, and for errors the
start of the message (the path of the field at fault) and, in a stream, its end
(" (micro-batch N)"). Any other outcome is "unexpected" and fails the soak.
"""

import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import grpc
import numpy as np

# The Python client: beside this file in the soak's snapshot of the code (soak.py copies both
# to --out, so that edits in the working tree cannot change a running soak), else the
# repository's client/python.
_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE if (_HERE / "lmhead_client").is_dir()
                       else _HERE.parents[1] / "client/python"))

from lmhead_client import BF16, LMHeadError, RemoteLMHead  # noqa: E402
from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb  # noqa: E402
from lmhead_client._proto.lmhead.v1 import lmhead_pb2_grpc as pb_grpc  # noqa: E402

SERVICE = "/lmhead.v1.LMHeadService/"
NOT_PROTOBUF = "request: not a valid "  # how a message that does not parse is refused
RESPONSE_LIMIT = "hidden_states.shape: the response would carry "  # --max_response_bytes
CALL_TIMEOUT_S = 30.0  # the deadline of every call that is meant to finish
StatusCode = grpc.StatusCode

# The kinds of calls, in the CSV's column order. killed_client is run by soak.py itself.
KINDS = ("unary", "golden", "stream", "bad_input", "bad_stream", "garbage", "cancel_unary",
         "cancel_stream", "deadline_unary", "deadline_stream", "limits", "meta", "killed_client")

# How often a worker picks each kind (relative weights).
WEIGHTS = {"unary": 30, "golden": 12, "stream": 10, "bad_input": 16, "bad_stream": 4,
           "garbage": 5, "cancel_unary": 4, "cancel_stream": 3, "deadline_unary": 4,
           "deadline_stream": 3, "limits": 1, "meta": 4}

@dataclass(frozen=True)
class ModelSpec:
    """What the soak needs to know of one served model (from ListModels)."""

    name: str
    d_model: int
    vocab_size: int
    dtype: int  # lmhead.v1.DataType of the compute
    loss_implementation: str  # the model's own: "default" or "fused_linear"
    normalized: bool
    bias: bool

    @staticmethod
    def from_info(info: pb.ModelInfo) -> "ModelSpec":
        normalized = info.config.name == pb.HEAD_TYPE_NORMALIZED
        return ModelSpec(
            name=info.name, d_model=info.d_model, vocab_size=info.vocab_size,
            dtype=info.config.dtype or pb.DATA_TYPE_FP32,
            loss_implementation=("fused_linear" if info.config.loss_implementation
                                 == pb.LOSS_IMPLEMENTATION_FUSED_LINEAR else "default"),
            normalized=normalized,
            # Unset: upstream's default, a bias on the default head and none on the normalized.
            bias=info.config.bias if info.config.HasField("bias") else not normalized)


@dataclass(frozen=True)
class Limits:
    """The server flags the soak starts it with (soak.py) that the load depends on."""

    max_message_bytes: int
    max_response_bytes: int
    max_open_streams: int


@dataclass
class LoadConfig:
    """Everything a worker process needs; pickled to it."""

    address: str
    models: List[ModelSpec]
    limits: Limits
    end: float  # time.monotonic() when workers stop (CLOCK_MONOTONIC is system-wide on Linux)
    pause_s: float  # sleep between two calls of one worker
    heavy_s: Dict[str, float]  # model -> its heavy call's duration, measured at the start
    seed: int
    kinds: List[str] = field(default_factory=lambda: list(WEIGHTS))  # the kinds workers run
    golden: List["Golden"] = field(default_factory=list)


@dataclass
class Case:
    """A valid forward call: the model, hidden states and RemoteLMHead.forward's arguments."""

    model: ModelSpec
    x: Any  # np.ndarray (float32/float16) or BF16
    kwargs: Dict[str, Any]


@dataclass
class Golden:
    """A case's answer on the idle server: case `index` of make_golden_case, and its fields."""

    index: int
    outputs: Dict[str, Optional[np.ndarray]]


class Tally:
    """Calls per kind, and how many of them had an unexpected outcome. Not thread-safe."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.unexpected: Counter = Counter()
        self.failures: List[str] = []  # the first few unexpected outcomes, described

    def record(self, kind: str, problem: Optional[str]) -> None:
        """One call of `kind`: problem None (as expected), or what went wrong."""
        self.calls[kind] += 1
        if problem is None:
            return
        self.unexpected[kind] += 1
        if len(self.failures) < 50:
            self.failures.append(f"{time.strftime('%H:%M:%S')} {kind}: {problem}")

    def snapshot(self) -> Dict[str, Any]:
        return {"calls": dict(self.calls), "unexpected": dict(self.unexpected),
                "failures": list(self.failures)}


# -- Valid requests ----------------------------------------------------------------------------


def random_hidden(rng: np.random.Generator, shape: Tuple[int, ...], dtype: str) -> Any:
    """Hidden states of `shape` as float32, float16 or bfloat16 (BF16 bits)."""
    values = rng.standard_normal(shape, dtype=np.float32)
    if dtype == "bf16":
        return BF16.from_float32(values)
    return values.astype(np.float16) if dtype == "fp16" else values


def make_case(rng: np.random.Generator, model: ModelSpec, max_tokens: int = 256) -> Case:
    """A random valid call: hidden dtype, labels or not (some ignored), reduction, z-loss,
    loss_div_factor, logits_to_keep (count or positions), argmax, return_logits, logits dtype,
    both loss implementations."""
    B = int(rng.integers(1, 5))
    S = int(rng.integers(1, max(2, min(96, max_tokens // B) + 1)))
    x = random_hidden(rng, (B, S, model.d_model), str(rng.choice(["fp32", "fp32", "fp16", "bf16"])))
    kwargs: Dict[str, Any] = {}
    implementation = "default" if model.normalized else str(
        rng.choice(["model", "default", "fused_linear"]))
    if implementation != "model":
        kwargs["loss_implementation"] = implementation
    effective = model.loss_implementation if implementation == "model" else implementation
    with_labels = rng.random() < 0.75
    if with_labels:
        kwargs.update(_label_args(rng, B, S, model.vocab_size))
    kwargs.update(_keep_args(rng, B, S))
    if rng.random() < 0.3:
        kwargs["return_argmax"] = True
    if with_labels and effective == "default" and rng.random() < 0.3:
        kwargs["return_logits"] = bool(rng.random() < 0.5)
    elif with_labels and effective == "fused_linear" and rng.random() < 0.2:
        kwargs["return_logits"] = False
    if rng.random() < 0.2:
        kwargs["logits_dtype"] = str(rng.choice(["bf16", "fp16", "fp32"]))
    if effective == "fused_linear" and rng.random() < 0.3:
        kwargs["logit_tile_bytes"] = int(rng.choice([1 << 14, 1 << 16, 1 << 20]))
    return Case(model, x, kwargs)


def _label_args(rng: np.random.Generator, B: int, S: int, V: int) -> Dict[str, Any]:
    """labels (int64 or int32) with some positions ignored, and the loss options."""
    ignore_index = int(rng.choice([-100, -100, -1]))
    labels = rng.integers(0, V, (B, S))
    ignored = rng.random((B, S)) < float(rng.choice([0.0, 0.2, 0.5, 1.0], p=[0.4, 0.3, 0.2, 0.1]))
    labels[ignored] = ignore_index
    args: Dict[str, Any] = {"labels": labels.astype(rng.choice([np.int64, np.int32]))}
    if ignore_index != -100:
        args["ignore_index"] = ignore_index
    args["loss_reduction"] = str(rng.choice(["mean", "sum", "none"]))
    if rng.random() < 0.5:
        args["z_loss_multiplier"] = float(rng.choice([1e-4, 0.0, 1e-2]))
    if rng.random() < 0.15:
        args["loss_div_factor"] = float(rng.choice([2.0, 0.5, 7.0]))
    return args


def _keep_args(rng: np.random.Generator, B: int, S: int) -> Dict[str, Any]:
    """logits_to_keep: all (usually), a count (positive, or negative: drop a prefix), or
    (B, K) positions."""
    choice = rng.random()
    if choice < 0.6:
        return {}
    if choice < 0.8:
        return {"logits_to_keep": int(rng.integers(-S, S + 2))}
    K = int(rng.integers(1, S + 1))
    return {"logits_to_keep": rng.integers(0, S, (B, K)).astype(np.int64)}


def make_golden_case(seed: int, index: int, model: ModelSpec) -> Case:
    """Golden case `index`: a small valid case, the same in every process."""
    return make_case(np.random.default_rng([seed, 7919, index]), model, max_tokens=96)


def kept_positions(S: int, keep: Any) -> int:
    """S' of upstream's position selection (an int is a Python slice h[:, -k:])."""
    if not isinstance(keep, (int, np.integer)):
        return int(keep.shape[1])
    return S if keep == 0 else len(range(S)[-int(keep):])


def output_fields(output: Any, kwargs: Dict[str, Any]) -> Dict[str, Optional[np.ndarray]]:
    """RemoteLMHead.forward's return value as {field: array or None}."""
    argmax = None
    if kwargs.get("return_argmax"):
        output, argmax = output
    fields: Dict[str, Optional[np.ndarray]] = {"argmax": argmax}
    if kwargs.get("labels") is None:
        fields["logits"] = output
    else:
        fields.update(output._asdict())
    return fields


def check_shapes(case: Case, fields: Dict[str, Optional[np.ndarray]]) -> Optional[str]:
    """Shapes and presence of a valid call's outputs, and argmax == logits.argmax(-1) where
    the logits are float32. None when all hold."""
    B, S = case.x.shape[0], case.x.shape[1]
    S_kept = kept_positions(S, case.kwargs.get("logits_to_keep", 0))
    V = case.model.vocab_size
    logits, argmax = fields.get("logits"), fields.get("argmax")
    if case.kwargs.get("return_argmax"):
        if argmax is None or argmax.shape != (B, S_kept):
            return f"argmax: expected shape {(B, S_kept)}, got {_shape(argmax)}"
    elif argmax is not None:
        return "argmax returned without return_argmax"
    if logits is not None and logits.shape != (B, S_kept, V):
        return f"logits: expected shape {(B, S_kept, V)}, got {logits.shape}"
    if case.kwargs.get("labels") is None and logits is None:
        return "no logits returned for a call without labels"
    if (logits is not None and argmax is not None and logits.dtype == np.float32
            and case.kwargs.get("logits_dtype") in (None, "fp32")
            and case.model.dtype == pb.DATA_TYPE_FP32 and np.isfinite(logits).all()
            and not np.array_equal(np.argmax(logits, axis=-1), argmax)):
        return "argmax differs from logits.argmax(-1)"
    return None


_TOLERANCES = {pb.DATA_TYPE_FP32: (1e-5, 1e-5), pb.DATA_TYPE_BF16: (1 / 64, 1e-2),
               pb.DATA_TYPE_FP16: (2e-3, 1e-3)}  # (rtol, atol) by the values' wire dtype
_LOGITS_DTYPES = {"bf16": pb.DATA_TYPE_BF16, "fp16": pb.DATA_TYPE_FP16, "fp32": pb.DATA_TYPE_FP32}


def compare_fields(got: Dict[str, Optional[np.ndarray]], want: Dict[str, Optional[np.ndarray]],
                   case: Case, streamed: bool = False) -> Optional[str]:
    """got == want, up to float summation order when `streamed` (a stream's micro-batches
    against one call): floats within the tolerance of the dtype they come in (the logits'
    dtype; the compute dtype for losses), argmax equal (a stream may differ at one position
    in a thousand, at least one: near ties). None when equal."""
    compute = case.model.dtype
    for name in sorted(set(got) | set(want)):
        a, b = got.get(name), want.get(name)
        if (a is None) != (b is None):
            return f"{name}: {'missing' if a is None else 'unexpected'}"
        if a is None:
            continue
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return f"{name}: shape {a.shape}, expected {b.shape}"
        if name == "argmax":
            wrong = int((a != b).sum())
            if wrong > (max(1, a.size // 1000) if streamed else 0):
                return f"argmax: {wrong} of {a.size} positions differ"
            continue
        # Logits are as precise as the coarser of the compute dtype and the returned one.
        dtypes = [compute, _LOGITS_DTYPES.get(case.kwargs.get("logits_dtype"), compute)]
        rtol, atol = max(_TOLERANCES.get(d, _TOLERANCES[pb.DATA_TYPE_BF16])
                         for d in (dtypes if name == "logits" else dtypes[:1]))
        if not np.allclose(a.astype(np.float64), b.astype(np.float64), rtol=rtol, atol=atol,
                           equal_nan=True):
            diff = np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)))
            return f"{name}: differs by up to {diff:.3g} (rtol {rtol}, atol {atol})"
    return None


def _shape(array: Optional[np.ndarray]) -> Optional[Tuple[int, ...]]:
    return None if array is None else tuple(array.shape)


# -- Malformed requests ------------------------------------------------------------------------


def tensor(dtype: int, shape: List[int], data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def good_request(rng: np.random.Generator, model: ModelSpec, B: int = 2, S: int = 3,
                 labels: bool = True) -> pb.ForwardRequest:
    """A valid request as a protobuf message (fp32 hidden states, int64 labels)."""
    x = rng.standard_normal((B, S, model.d_model), dtype=np.float32)
    request = pb.ForwardRequest(model=model.name,
                                hidden_states=tensor(pb.DATA_TYPE_FP32, [B, S, model.d_model],
                                                     x.astype("<f4").tobytes()))
    if labels:
        y = rng.integers(0, model.vocab_size, (B, S)).astype("<i8")
        request.labels.CopyFrom(tensor(pb.DATA_TYPE_INT64, [B, S], y.tobytes()))
    return request


@dataclass(frozen=True)
class BadCase:
    """A malformed request: how to make it from a good (2, 3) request with labels, and the
    status code and message start the server must answer with."""

    name: str
    mutate: Callable[[pb.ForwardRequest, ModelSpec], None]
    code: StatusCode
    prefix: str
    labels: bool = True
    fused: bool = False  # needs fused_linear, which the normalized head lacks (UNIMPLEMENTED)


def _set_shape(t: pb.Tensor, shape: List[int]) -> None:
    del t.shape[:]
    t.shape.extend(shape)


def _labels_all(value: Optional[int]) -> Callable[[pb.ForwardRequest, ModelSpec], None]:
    def mutate(q: pb.ForwardRequest, m: ModelSpec) -> None:
        v = m.vocab_size if value is None else value
        q.labels.data = np.full(6, v, "<i8").tobytes()
    return mutate


def _hidden_dtype(dtype: int) -> Callable[[pb.ForwardRequest, ModelSpec], None]:
    def mutate(q: pb.ForwardRequest, m: ModelSpec) -> None:
        q.hidden_states.dtype = dtype
    return mutate


def _wrong_d_model(q: pb.ForwardRequest, m: ModelSpec) -> None:
    q.hidden_states.CopyFrom(tensor(pb.DATA_TYPE_FP32, [2, 3, m.d_model + 1],
                                    bytes(4 * 6 * (m.d_model + 1))))


def _positions(dtype: int, values: List[int], rows: int) -> Callable[[pb.ForwardRequest,
                                                                     ModelSpec], None]:
    def mutate(q: pb.ForwardRequest, m: ModelSpec) -> None:
        np_dtype = "<i8" if dtype == pb.DATA_TYPE_INT64 else "<f4"
        q.options.logits_to_keep_positions.CopyFrom(
            tensor(dtype, [rows, len(values) // rows], np.array(values, np_dtype).tobytes()))
    return mutate


def _div_factor_3x1(q: pb.ForwardRequest, m: ModelSpec) -> None:
    q.options.loss_reduction = pb.LOSS_REDUCTION_NONE
    q.options.loss_div_factor_tensor.CopyFrom(
        tensor(pb.DATA_TYPE_FP32, [3, 1], np.ones(3, "<f4").tobytes()))


def _contradict_bias(q: pb.ForwardRequest, m: ModelSpec) -> None:
    q.config.bias = not m.bias


def _fused_return_logits(q: pb.ForwardRequest, m: ModelSpec) -> None:
    q.config.loss_implementation = pb.LOSS_IMPLEMENTATION_FUSED_LINEAR
    q.options.return_logits = True


IA, NF = StatusCode.INVALID_ARGUMENT, StatusCode.NOT_FOUND
BAD_CASES: List[BadCase] = [
    BadCase("hidden_rank2", lambda q, m: _set_shape(q.hidden_states, [6, m.d_model]), IA,
            "hidden_states.shape"),
    BadCase("hidden_wrong_d_model", _wrong_d_model, IA, "hidden_states.shape"),
    BadCase("hidden_negative_dim", lambda q, m: _set_shape(q.hidden_states, [2, -3, m.d_model]),
            IA, "hidden_states.shape"),
    BadCase("hidden_shape_overflow",
            lambda q, m: _set_shape(q.hidden_states, [2**62, 2**62, m.d_model]), IA,
            "hidden_states.shape"),
    BadCase("hidden_int64", _hidden_dtype(pb.DATA_TYPE_INT64), IA, "hidden_states.dtype"),
    BadCase("hidden_dtype_unspecified", _hidden_dtype(pb.DATA_TYPE_UNSPECIFIED), IA,
            "hidden_states.dtype"),
    BadCase("hidden_dtype_99", _hidden_dtype(99), IA, "hidden_states.dtype"),
    BadCase("hidden_one_byte_short",
            lambda q, m: setattr(q.hidden_states, "data", q.hidden_states.data[:-1]), IA,
            "hidden_states.data"),
    BadCase("hidden_four_bytes_long",
            lambda q, m: setattr(q.hidden_states, "data", q.hidden_states.data + b"\0" * 4), IA,
            "hidden_states.data"),
    BadCase("labels_fp32", lambda q, m: q.labels.CopyFrom(
        tensor(pb.DATA_TYPE_FP32, [2, 3], bytes(24))), IA, "labels.dtype"),
    BadCase("labels_wrong_shape", lambda q, m: q.labels.CopyFrom(
        tensor(pb.DATA_TYPE_INT64, [2, 4], bytes(64))), IA, "labels.shape"),
    BadCase("labels_vocab_size", _labels_all(None), IA, "labels"),
    BadCase("labels_negative", _labels_all(-5), IA, "labels"),
    BadCase("labels_one_byte_short",
            lambda q, m: setattr(q.labels, "data", q.labels.data[:-1]), IA, "labels.data"),
    BadCase("unknown_model", lambda q, m: setattr(q, "model", "no-such-model"), NF,
            "model: no model named"),
    BadCase("model_name_64k", lambda q, m: setattr(q, "model", "x" * 65536), NF,
            "model: no model named"),
    BadCase("reduction_77", lambda q, m: setattr(q.options, "loss_reduction", 77), IA,
            "options.loss_reduction"),
    BadCase("implementation_9", lambda q, m: setattr(q.config, "loss_implementation", 9), IA,
            "config.loss_implementation"),
    BadCase("logits_dtype_42", lambda q, m: setattr(q.options, "logits_dtype", 42), IA,
            "options.logits_dtype"),
    BadCase("logits_dtype_int64",
            lambda q, m: setattr(q.options, "logits_dtype", pb.DATA_TYPE_INT64), IA,
            "options.logits_dtype"),
    BadCase("config_dtype_99", lambda q, m: setattr(q.config, "dtype", 99), IA, "config.dtype"),
    BadCase("config_contradicts_bias", _contradict_bias, IA, "config.bias"),
    BadCase("keep_positions_out_of_range", _positions(pb.DATA_TYPE_INT64, [3, 0], 2), IA,
            "options.logits_to_keep_positions"),
    BadCase("keep_positions_fp32", _positions(pb.DATA_TYPE_FP32, [1, 0], 2), IA,
            "options.logits_to_keep_positions.dtype"),
    BadCase("keep_positions_wrong_rows", _positions(pb.DATA_TYPE_INT64, [1, 0, 0], 3), IA,
            "options.logits_to_keep_positions.shape"),
    BadCase("return_logits_false_without_labels",
            lambda q, m: setattr(q.options, "return_logits", False), IA, "options.return_logits",
            labels=False),
    BadCase("return_logits_true_with_fused", _fused_return_logits, IA, "options.return_logits",
            fused=True),
    BadCase("logit_tile_bytes_negative",
            lambda q, m: setattr(q.options, "logit_tile_bytes", -1), IA,
            "options.logit_tile_bytes"),
    BadCase("div_factor_int64", lambda q, m: q.options.loss_div_factor_tensor.CopyFrom(
        tensor(pb.DATA_TYPE_INT64, [], bytes(8))), IA, "options.loss_div_factor_tensor.dtype"),
    BadCase("labels_per_row_div_factor_3x1", _div_factor_3x1, IA,
            "options.loss_div_factor_tensor"),
]


def classify(name: str, code: StatusCode, details: str, want_code: StatusCode,
             want_prefix: str, micro_batch: Optional[int] = None) -> Optional[str]:
    """None when `code` is `want_code` and `details` starts with `want_prefix` (and, for a
    stream's micro-batch, ends with " (micro-batch N)"); else a description of the outcome."""
    suffix = "" if micro_batch is None else f" (micro-batch {micro_batch})"
    if code == want_code and details.startswith(want_prefix) and details.endswith(suffix):
        return None
    return (f"{name}: expected {want_code.name} '{want_prefix}...{suffix}', got {code.name} "
            f"{details[:300]!r}")


def rpc_outcome(call: Callable[[], Any]) -> Tuple[StatusCode, str, Any]:
    """(code, details, result) of a blocking call."""
    try:
        return StatusCode.OK, "", call()
    except grpc.RpcError as error:
        return error.code(), error.details() or "", None
    except LMHeadError as error:
        return error.code, error.details, None


def garbage_bytes(rng: np.random.Generator, good: bytes) -> bytes:
    """Bytes that are not a valid protobuf message: random bytes after an invalid tag (field
    number 0 or an over-long varint), or a valid request cut inside its hidden states."""
    choice = rng.random()
    if choice < 0.4:
        body = b"\x00"
    elif choice < 0.7:
        body = b"\xff" * 11
    else:
        return good[: int(rng.integers(8, len(good) - 8))]
    return body + rng.integers(0, 256, int(rng.integers(0, 2048)), dtype=np.uint8).tobytes()


def is_valid_protobuf(data: bytes) -> bool:
    try:
        pb.ForwardRequest.FromString(data)
        return True
    except Exception:  # noqa: BLE001 - protobuf's DecodeError, whatever the implementation
        return False


# -- Heavy requests (cancellations, deadlines, victims) ----------------------------------------


def heavy_tokens(model: ModelSpec, limits: Limits) -> int:
    """Tokens of the heavy call: about 5e8 multiply-adds, tens of ms on one CPU core, and
    well inside the message limit."""
    tokens = max(64, int(5.2e8 // (model.d_model * model.vocab_size)))
    return int(min(tokens, limits.max_message_bytes // (8 * model.d_model)))


def heavy_request(rng: np.random.Generator, model: ModelSpec, limits: Limits) -> pb.ForwardRequest:
    """A valid request that computes for tens of milliseconds and returns little:
    fused_linear in many small tiles of logits (default and return_logits=False on a normalized head)."""
    tokens = heavy_tokens(model, limits)
    request = good_request(rng, model, B=4, S=max(1, tokens // 4))
    if model.normalized:
        request.options.return_logits = False
    else:
        request.config.loss_implementation = pb.LOSS_IMPLEMENTATION_FUSED_LINEAR
        request.options.logit_tile_bytes = 256 << 10
    return request


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1),
                                                   ("grpc.max_receive_message_length", -1)])


# -- The worker --------------------------------------------------------------------------------


class Worker:
    """One client process's bounded loop of calls of randomly chosen kinds (config.kinds, by
    WEIGHTS)."""

    def __init__(self, config: LoadConfig, worker_id: int):
        self.config = config
        self.rng = np.random.default_rng([config.seed, worker_id])
        self.tally = Tally()
        self.channel = channel(config.address)
        self.stub = pb_grpc.LMHeadServiceStub(self.channel)
        self.heads = {m.name: RemoteLMHead(config.address, model=m.name, timeout=CALL_TIMEOUT_S)
                      for m in config.models}
        self.golden_cases = {g.index: make_golden_case(config.seed, g.index,
                                                       self._golden_model(g.index))
                             for g in config.golden}
        # Two heavy requests per model, made once (making one costs ~10 ms of CPU).
        self.heavy = {m.name: [heavy_request(self.rng, m, config.limits) for _ in range(2)]
                      for m in config.models}

    def _golden_model(self, index: int) -> ModelSpec:
        return self.config.models[index % len(self.config.models)]

    def model(self) -> ModelSpec:
        return self.config.models[int(self.rng.integers(len(self.config.models)))]

    def heavy_request(self, model: ModelSpec) -> pb.ForwardRequest:
        return self.heavy[model.name][int(self.rng.integers(2))]

    def run(self, report: Callable[[Dict[str, Any]], None], stop: Any,
            report_every_s: float = 5.0) -> None:
        """Runs calls until the time is up or `stop` (an Event) is set (at most 1000 calls per
        second of the time), reporting the tally every `report_every_s` seconds and at the
        end."""
        kinds = list(self.config.kinds)
        weights = np.array([WEIGHTS[k] for k in kinds], dtype=np.float64)
        end = self.config.end
        next_report = time.monotonic() + report_every_s
        for _ in range(int(max(0.0, end - time.monotonic()) * 1000) + 1):
            if time.monotonic() >= end or stop.is_set():
                break
            kind = kinds[int(self.rng.choice(len(kinds), p=weights / weights.sum()))]
            try:
                getattr(self, "do_" + kind)()
            except Exception as error:  # noqa: BLE001 - a client-side bug must not end the loop
                self.tally.record(kind, f"client exception {type(error).__name__}: {error}")
            if time.monotonic() >= next_report:
                report(self.tally.snapshot())
                next_report = time.monotonic() + report_every_s
            time.sleep(self.config.pause_s)
        report(self.tally.snapshot())

    # Each do_<kind> makes one call (or one stream) and records it.

    def do_unary(self) -> None:
        case = make_case(self.rng, self.model())
        code, details, output = rpc_outcome(
            lambda: self.heads[case.model.name].forward(case.x, **case.kwargs))
        if code != StatusCode.OK:
            self.tally.record("unary", f"{_describe(case)}: {code.name} {details[:200]!r}")
            return
        self.tally.record("unary", _prefixed(case, check_shapes(case, output_fields(
            output, case.kwargs))))

    def do_golden(self) -> None:
        golden = self.config.golden[int(self.rng.integers(len(self.config.golden)))]
        case = self.golden_cases[golden.index]
        code, details, output = rpc_outcome(
            lambda: self.heads[case.model.name].forward(case.x, **case.kwargs))
        if code != StatusCode.OK:
            self.tally.record("golden", f"{_describe(case)}: {code.name} {details[:200]!r}")
            return
        problem = compare_fields(output_fields(output, case.kwargs), golden.outputs, case)
        self.tally.record("golden", _prefixed(case, problem))

    def do_stream(self) -> None:
        """A golden case over ForwardStream in micro-batches of 1-2 rows, combined by the client:
        the same answer as the unary call, up to float summation order."""
        golden = self.config.golden[int(self.rng.integers(len(self.config.golden)))]
        case = self.golden_cases[golden.index]
        rows = int(self.rng.integers(1, 3))
        code, details, output = rpc_outcome(lambda: self.heads[case.model.name].forward_stream(
            case.x, micro_batch_size=rows, **case.kwargs))
        if code != StatusCode.OK:
            self.tally.record("stream", f"{_describe(case)}: {code.name} {details[:200]!r}")
            return
        problem = compare_fields(output_fields(output, case.kwargs), golden.outputs, case,
                                 streamed=True)
        self.tally.record("stream", _prefixed(case, problem))

    def bad_case(self) -> Tuple[BadCase, ModelSpec]:
        """A random malformed request kind, and a model it applies to."""
        bad, model = BAD_CASES[int(self.rng.integers(len(BAD_CASES)))], self.model()
        for _ in range(100):
            if not (bad.fused and model.normalized):
                break
            bad, model = BAD_CASES[int(self.rng.integers(len(BAD_CASES)))], self.model()
        return bad, model

    def do_bad_input(self) -> None:
        bad, model = self.bad_case()
        request = good_request(self.rng, model, labels=bad.labels)
        bad.mutate(request, model)
        code, details, _ = rpc_outcome(lambda: self.stub.Forward(request, timeout=CALL_TIMEOUT_S))
        self.tally.record("bad_input", classify(bad.name, code, details, bad.code, bad.prefix))

    def do_bad_stream(self) -> None:
        """Good micro-batches, then a bad one at index k: the stream ends with its status, the
        message ending ' (micro-batch k)', after k answers."""
        bad, model = self.bad_case()
        k = int(self.rng.integers(0, 3))
        requests = [good_request(self.rng, model) for _ in range(k)]
        request = good_request(self.rng, model, labels=bad.labels)
        bad.mutate(request, model)
        requests.append(request)
        answers: List[pb.ForwardResponse] = []
        code, details, _ = rpc_outcome(lambda: answers.extend(
            self.stub.ForwardStream(iter(requests), timeout=CALL_TIMEOUT_S)))
        problem = classify(bad.name, code, details, bad.code, bad.prefix, micro_batch=k)
        if problem is None and len(answers) != k:
            problem = f"{bad.name}: {len(answers)} answers before the error, expected {k}"
        self.tally.record("bad_stream", problem)

    def do_garbage(self) -> None:
        """Bytes that are not protobuf, through a raw method: INVALID_ARGUMENT saying so (an
        unknown method: UNIMPLEMENTED)."""
        good = good_request(self.rng, self.model()).SerializeToString()
        data = garbage_bytes(self.rng, good)
        for _ in range(10):
            if not is_valid_protobuf(data):
                break
            data = garbage_bytes(self.rng, good)
        method = str(self.rng.choice(["Forward", "ForwardStream", "GetModel", "ListModels",
                                      "NoSuchMethod"]))
        if method == "ForwardStream":
            self._garbage_stream(good, data)
            return
        call = self.channel.unary_unary(SERVICE + method)
        code, details, _ = rpc_outcome(lambda: call(data, timeout=CALL_TIMEOUT_S))
        if method == "NoSuchMethod":
            problem = classify("garbage.NoSuchMethod", code, details, StatusCode.UNIMPLEMENTED, "")
        else:
            problem = classify(f"garbage.{method}", code, details, IA, NOT_PROTOBUF)
        self.tally.record("garbage", problem)

    def _garbage_stream(self, good: bytes, data: bytes) -> None:
        first = bool(self.rng.random() < 0.5)
        messages = [data] if first else [good, data, good]
        call = self.channel.stream_stream(SERVICE + "ForwardStream")
        answers: List[bytes] = []
        code, details, _ = rpc_outcome(lambda: answers.extend(call(iter(messages),
                                                                   timeout=CALL_TIMEOUT_S)))
        index = 0 if first else 1
        problem = classify("garbage.ForwardStream", code, details, IA, NOT_PROTOBUF,
                           micro_batch=index)
        if problem is None and len(answers) != index:
            problem = (f"garbage.ForwardStream: {len(answers)} answers before the error, "
                       f"expected {index}")
        self.tally.record("garbage", problem)

    def do_cancel_unary(self) -> None:
        """A heavy Forward cancelled at a random moment: CANCELLED when the cancel came first,
        else OK."""
        model = self.model()
        future = self.stub.Forward.future(self.heavy_request(model), timeout=CALL_TIMEOUT_S)
        time.sleep(float(self.rng.uniform(0, 1.5 * self.config.heavy_s[model.name])))
        cancelled = future.cancel()
        _wait_done(future)
        code = future.code()
        want = StatusCode.CANCELLED if cancelled else StatusCode.OK
        self.tally.record("cancel_unary", None if code == want else
                          f"cancel() returned {cancelled}: expected {want.name}, got {code.name} "
                          f"{(future.details() or '')[:200]!r}")

    def do_cancel_stream(self) -> None:
        """A stream of heavy micro-batches that the client keeps open, cancelled at a random
        moment: CANCELLED."""
        model = self.model()
        requests = self.heavy[model.name]
        done = threading.Event()
        call = self.stub.ForwardStream(_held_open(requests, done), timeout=CALL_TIMEOUT_S)
        time.sleep(float(self.rng.uniform(0, 2 * self.config.heavy_s[model.name])))
        call.cancel()
        code, details, _ = rpc_outcome(lambda: list(call))
        done.set()
        self.tally.record("cancel_stream", None if code == StatusCode.CANCELLED else
                          f"expected CANCELLED, got {code.name} {details[:200]!r}")

    def do_deadline_unary(self) -> None:
        """A heavy Forward with a deadline of 1/20 to 1/8 of the time it took at the start
        (the fastest of 5; margin for a machine that was busy then and is idle now)."""
        model = self.model()
        heavy_s = self.config.heavy_s[model.name]
        timeout = float(self.rng.uniform(heavy_s / 20, heavy_s / 8))
        code, details, _ = rpc_outcome(lambda: self.stub.Forward(
            self.heavy_request(model), timeout=timeout))
        self.tally.record("deadline_unary", None if code == StatusCode.DEADLINE_EXCEEDED else
                          f"expected DEADLINE_EXCEEDED, got {code.name} {details[:200]!r}")

    def do_deadline_stream(self) -> None:
        """A stream that outlives its deadline: the client sends one small micro-batch or six
        heavy ones, then keeps the stream open, so that only the deadline can end it."""
        model = self.model()
        done = threading.Event()
        if self.rng.random() < 0.5:
            requests, timeout = [good_request(self.rng, model)], 0.2
        else:
            requests = self.heavy[model.name] * 3
            timeout = 3 * self.config.heavy_s[model.name]
        code, details, _ = rpc_outcome(lambda: list(self.stub.ForwardStream(
            _held_open(requests, done), timeout=timeout)))
        done.set()
        self.tally.record("deadline_stream", None if code == StatusCode.DEADLINE_EXCEEDED else
                          f"expected DEADLINE_EXCEEDED, got {code.name} {details[:200]!r}")

    def do_limits(self) -> None:
        """A request over --max_message_bytes, or logits over --max_response_bytes (alone, or
        with argmax and per-token losses): RESOURCE_EXHAUSTED."""
        model = self.model()
        name, request = limit_request(self.rng, model, self.config.limits,
                                      int(self.rng.integers(3)))
        code, details, _ = rpc_outcome(lambda: self.stub.Forward(request, timeout=CALL_TIMEOUT_S))
        # Over the message limit, gRPC answers before the server sees the request.
        prefix = "" if name == "message_over_limit" else RESPONSE_LIMIT
        self.tally.record("limits", classify(name, code, details, StatusCode.RESOURCE_EXHAUSTED,
                                             prefix))

    def do_meta(self) -> None:
        """Health, ListModels, GetModel (a served model, and an unknown one)."""
        head = self.heads[self.model().name]
        choice = int(self.rng.integers(4))
        if choice == 0:
            code, details, status = rpc_outcome(lambda: head.health(
                str(self.rng.choice(["", "lmhead.v1.LMHeadService"]))))
            problem = None if status == "SERVING" else f"health: {status} {code.name} {details}"
        elif choice == 1:
            code, details, models = rpc_outcome(head.list_models)
            names = sorted(m.name for m in models or [])
            want = sorted(m.name for m in self.config.models)
            problem = None if names == want else f"ListModels: {names}, expected {want}"
        elif choice == 2:
            code, details, info = rpc_outcome(head.get_model)
            problem = None if info is not None and info.name == head.model else (
                f"GetModel({head.model}): {code.name} {details[:200]!r}")
        else:
            code, details, _ = rpc_outcome(lambda: head.get_model("no-such-model"))
            problem = classify("get_model_unknown", code, details, NF, "name: no model named")
        self.tally.record("meta", problem)


def limit_request(rng: np.random.Generator, model: ModelSpec, limits: Limits,
                  which: int) -> Tuple[str, pb.ForwardRequest]:
    """(name, request) of a request just over one of the server's limits: 0, the request
    message; 1, the logits alone; 2, logits just under the response limit whose argmax and
    per-token losses take the response over it (logits returned as FP32). 1 and 2 fall back
    to 0 where their hidden states would not fit the message limit."""
    d, V = model.d_model, model.vocab_size
    tokens = limits.max_response_bytes // (4 * V) + 1
    if which == 0 or tokens * (4 * d + 8) > limits.max_message_bytes - (1 << 16):
        tokens = limits.max_message_bytes // (4 * d) + 1
        return "message_over_limit", good_request(rng, model, B=1, S=tokens, labels=False)
    if which == 1:
        request = good_request(rng, model, B=1, S=tokens, labels=False)
        request.options.logits_dtype = pb.DATA_TYPE_FP32
        return "logits_over_response_limit", request
    request = good_request(rng, model, B=1, S=tokens - 1)
    request.config.loss_implementation = pb.LOSS_IMPLEMENTATION_DEFAULT
    request.options.loss_reduction = pb.LOSS_REDUCTION_NONE
    request.options.return_argmax = True
    request.options.logits_dtype = pb.DATA_TYPE_FP32
    return "response_bound_counts_argmax", request


def _held_open(requests: List[pb.ForwardRequest], done: threading.Event,
               hold_s: float = 10.0) -> Iterator[pb.ForwardRequest]:
    """Yields the requests, then keeps the stream open (no half-close) until `done` is set
    or `hold_s` passes."""
    yield from requests
    done.wait(hold_s)


def _wait_done(future: grpc.Future, seconds: float = CALL_TIMEOUT_S + 5) -> None:
    end = time.monotonic() + seconds
    while not future.done() and time.monotonic() < end:
        time.sleep(0.005)


def _describe(case: Case) -> str:
    args = {k: (v if isinstance(v, (int, float, str, bool)) else f"<{getattr(v, 'shape', '?')}>")
            for k, v in case.kwargs.items()}
    x_type = "bf16" if isinstance(case.x, BF16) else str(case.x.dtype)
    return f"model {case.model.name} x {x_type}{list(case.x.shape)} {args}"


def _prefixed(case: Case, problem: Optional[str]) -> Optional[str]:
    return None if problem is None else f"{_describe(case)}: {problem}"


def worker_main(config: LoadConfig, worker_id: int, queue: Any, stop: Any) -> None:
    """A worker process's entry point: runs the loop until the end or `stop` (an Event),
    putting ("tally", id, snapshot) on the queue every few seconds and ("done", id, snapshot)
    at the end."""
    worker = Worker(config, worker_id)
    worker.run(lambda snapshot: queue.put(("tally", worker_id, snapshot)), stop)
    queue.put(("done", worker_id, worker.tally.snapshot()))
    worker.channel.close()


# -- Golden answers (computed in the soak's main process on the idle server) -------------------


def compute_golden(config: LoadConfig, count: int) -> List[Golden]:
    """The answers of `count` golden cases (spread over the models) on the idle server."""
    heads = {m.name: RemoteLMHead(config.address, model=m.name, timeout=CALL_TIMEOUT_S)
             for m in config.models}
    golden = []
    for index in range(count):
        case = make_golden_case(config.seed, index, config.models[index % len(config.models)])
        output = heads[case.model.name].forward(case.x, **case.kwargs)
        fields = output_fields(output, case.kwargs)
        problem = check_shapes(case, fields)
        if problem is not None:
            raise RuntimeError(f"golden case {index}: {_describe(case)}: {problem}")
        golden.append(Golden(index, fields))
    for head in heads.values():
        head.close()
    return golden


def calibrate_heavy(config: LoadConfig, repeats: int = 5) -> Dict[str, float]:
    """Seconds each model's heavy call takes on the idle server (the fastest of `repeats`)."""
    rng = np.random.default_rng(config.seed)
    seconds = {}
    with channel(config.address) as ch:
        stub = pb_grpc.LMHeadServiceStub(ch)
        for model in config.models:
            request = heavy_request(rng, model, config.limits)
            times = []
            for _ in range(repeats):
                start = time.monotonic()
                stub.Forward(request, timeout=CALL_TIMEOUT_S)
                times.append(time.monotonic() - start)
            seconds[model.name] = min(times)
    return seconds


def admission_check(config: LoadConfig, settle_s: float = 2.0) -> Optional[str]:
    """With no other load (after `settle_s`): --max_open_streams streams held open each
    get their first answer, one more then gets RESOURCE_EXHAUSTED, and once they are closed a
    Forward succeeds. A slot leaked by a cancelled, timed-out or killed call would show as an
    early RESOURCE_EXHAUSTED. None when all holds."""
    time.sleep(settle_s)
    model, limit = config.models[0], config.limits.max_open_streams
    rng = np.random.default_rng(config.seed)
    done = threading.Event()
    with channel(config.address) as ch:
        stub = pb_grpc.LMHeadServiceStub(ch)
        calls = []
        try:
            for i in range(limit + 1):
                calls.append(stub.ForwardStream(_held_open([good_request(rng, model)], done, 60),
                                                timeout=CALL_TIMEOUT_S))
                code, details, _ = rpc_outcome(lambda: next(calls[-1]))
                want = StatusCode.OK if i < limit else StatusCode.RESOURCE_EXHAUSTED
                if code != want:
                    return (f"stream {i + 1} with a limit of {limit}: expected {want.name}, got "
                            f"{code.name} {details[:200]!r}")
        finally:
            done.set()
            for call in calls:
                rpc_outcome(lambda: list(call))  # noqa: B023 - called at once
        code, details, _ = rpc_outcome(lambda: stub.Forward(good_request(rng, model),
                                                            timeout=CALL_TIMEOUT_S))
        if code != StatusCode.OK:
            return f"Forward after the streams closed: {code.name} {details[:200]!r}"
    return None


# -- Victims: client processes killed with SIGKILL mid-call ------------------------------------

VICTIM_MODES = ("stream_slow", "stream_ahead", "unary_heavy")
VICTIM_SECONDS = 30.0  # a victim runs this long at most, if nobody kills it


def victim_main(config: LoadConfig, mode: str, seed: int, ready: Any) -> None:
    """A client process that the soak kills: it sends one byte on `ready` once its first
    answer has come, then keeps calling for up to VICTIM_SECONDS (then exits 3, which the
    soak counts as a failure: it was meant to be killed mid-call)."""
    rng = np.random.default_rng([config.seed, 104729, seed])
    model = config.models[seed % len(config.models)]
    end = time.monotonic() + VICTIM_SECONDS
    with channel(config.address) as ch:
        stub = pb_grpc.LMHeadServiceStub(ch)
        if mode == "unary_heavy":
            request = heavy_request(rng, model, config.limits)
            for i in range(int(VICTIM_SECONDS / max(config.heavy_s[model.name], 1e-3)) + 1):
                if time.monotonic() >= end:
                    break
                stub.Forward(request, timeout=CALL_TIMEOUT_S)
                if i == 0:
                    ready.send_bytes(b"1")
        else:
            slow = mode == "stream_slow"
            requests = _victim_stream(rng, model, config.limits, slow, end)
            for i, _ in enumerate(stub.ForwardStream(requests, timeout=VICTIM_SECONDS + 5)):
                if i == 0:
                    ready.send_bytes(b"1")
                if not slow:
                    time.sleep(0.01)  # reads slower than the server answers
    os._exit(3)


def _victim_stream(rng: np.random.Generator, model: ModelSpec, limits: Limits, slow: bool,
                   end: float) -> Iterator[pb.ForwardRequest]:
    """Micro-batches until `end`: small ones every 50 ms (slow), or (4, 128) ones as fast as
    gRPC takes them."""
    for _ in range(4000):
        if time.monotonic() >= end:
            return
        if slow:
            yield good_request(rng, model, B=1, S=8)
            time.sleep(0.05)
        else:
            yield good_request(rng, model, B=4, S=128)
