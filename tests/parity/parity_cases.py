"""The parity cases against olmo_core, shared by tests/parity (our core, through
parity_runner) and tests/e2e_python (the real server, through gRPC and the Python client).

Generates a seeded grid of cases (a greedy pairwise covering design over the forward's options,
plus targeted edge and error cases), materializes each (olmo_core head with random weights,
inputs, files for our side), computes its reference and compares outputs. References:

- `olmo`: olmo_core itself (the default loss path, every logits-only call, every error it raises).
  cute_rms / fused_rms need GPU packages; olmo_core's `rms` with the same options stands in.
- `fp64`: fused_linear with labels. Liger needs a GPU, so the reference is docs/SPEC.md §2.4
  computed in float64. Where the two paths agree (mean/sum, a multiplier, a valid label) the
  result must also match olmo_core's default path.
- `spec`: construction errors of cute_rms / fused_rms, which upstream raises only once their
  kernels' packages import (docs/SPEC.md §5).
- `deviation`: where we chose to differ from upstream (docs/SPEC.md §9.2, whose numbers the
  `why` strings below cite).

On a GPU (`device_expectation`, LMHEAD_PARITY_DEVICE=cuda:N in test_parity.py) the references
are upstream itself on that GPU: `olmo@cuda` (olmo_core's PyTorch path) and `liger@cuda`
(olmo_core's fused_linear path, the real Liger-Kernel), with the same tolerances, plus a float64
reference (`exact`) for each; errors are still taken from the CPU (see device_expectation).

Python exceptions map to status codes: NotImplementedError -> UNIMPLEMENTED; OLMoConfigurationError,
RuntimeError, ValueError, IndexError -> INVALID_ARGUMENT.
"""

import copy
import dataclasses
import itertools
import math
import random
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union
from unittest import mock

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import olmo_core.nn.lm_head as olmo_lm_head

from olmo_core.config import DType
from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.nn.layer_norm import LayerNormConfig, LayerNormType
from olmo_core.nn.lm_head import LMHeadConfig, LMHeadType, LMLossImplementation

SEED = 20261127
MIN_CASES = 500
FIELDS = ("logits", "loss", "ce_loss", "z_loss")
# torch.testing.assert_close's defaults for each head dtype (rtol, atol).
TOLERANCES = {"float32": (1.3e-6, 1e-5), "bfloat16": (1.6e-2, 1e-5), "float16": (1e-3, 1e-5)}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# fused_linear with no tokens: upstream divides by zero inside Liger. We chose the empty-sum
# result (docs/SPEC.md §9.2, deviation 4): "mean"/"sum" give 0, "none" gives (B, 0) (and fails
# for B = 0 like every "none" reshape).
FUSED_EMPTY_IS_ERROR = False


# ---------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass(frozen=True)
class Case:
    head: str = "default"
    norm: Optional[Tuple[Tuple[str, object], ...]] = None  # (("name", "rms"), ("bias", False))
    bias: Optional[bool] = None
    dtype: str = "float32"
    impl: str = "default"  # config.loss_implementation
    impl_option: Optional[str] = None  # options.loss_implementation (our extension)
    B: int = 2
    S: int = 5
    D: int = 16
    V: int = 53
    # absent | valid | some_ignored | rows_ignored | all_ignored | out_of_range |
    # out_of_range_dropped
    labels: str = "valid"
    bad_label: int = 0  # the value used by out_of_range labels
    ignore_index: int = -100
    reduction: str = "mean"
    zml: Optional[float] = None
    div: Union[None, float, str] = None  # a number, "tensor" ((B, 1)) or "scalar_tensor" (0-d)
    # an int, or a kind of positions tensor: tensor, tensor_empty, tensor_short, tensor_long,
    # tensor_1d, tensor_0d, tensor_3d, tensor_oob, tensor_neg, tensor_int32
    keep: Union[int, str] = 0
    return_logits: Optional[bool] = None
    x_dtype: Optional[str] = None  # the input's dtype when it differs from the head's
    tile_bytes: Optional[int] = None  # options.logit_tile_bytes

    @property
    def effective_impl(self) -> str:
        return self.impl_option or self.impl

    def describe(self) -> str:
        fields = dataclasses.asdict(self)
        defaults = dataclasses.asdict(Case())
        return ", ".join(f"{k}={v!r}" for k, v in fields.items() if v != defaults[k] or k == "head")


def norm(name: str, **options) -> Tuple[Tuple[str, object], ...]:
    return (("name", name),) + tuple(sorted(options.items()))


# Valid layer norms for the covering design (invalid ones are targeted cases).
NORMS = [
    None,
    norm("default"),
    norm("default", bias=False),
    norm("default", elementwise_affine=False),
    norm("default", full_precision=False),
    norm("default", eps=1e-3),
    norm("default", dtype="bfloat16", full_precision=False),
    norm("rms"),
    norm("rms", bias=False),
    norm("rms", elementwise_affine=False),
    norm("rms", full_precision=False),
    norm("rms", eps=1e-6),
    norm("rms", dtype="bfloat16"),
    norm("qwen_rms"),
    norm("qwen_rms", bias=False),
    norm("qwen_rms", full_precision=False),
    norm("qwen_rms", dtype="bfloat16", eps=1e-6),
    norm("cute_rms"),
    norm("cute_rms", bias=False, elementwise_affine=False),
    norm("fused_rms"),
    norm("fused_rms", bias=False, eps=1e-6),
    norm("l2_norm"),
]

FACTORS = {
    "head": ["default", "normalized"],
    "norm": NORMS,
    "bias": [None, True, False],
    "dtype": ["float32", "bfloat16"],
    "reduction": ["mean", "sum", "none"],
    "zml": [None, 0.0, 1e-4, 1e-3],
    "div": [None, "number", "tensor"],
    "keep": [0, 5, -3, "tensor"],
    "labels": ["absent", "valid", "some_ignored", "rows_ignored", "all_ignored"],
    "return_logits": [None, True, False],
    "impl": ["default", "fused_linear"],
}


def _random_levels(rng: random.Random) -> Dict[str, int]:
    """A random choice of level per factor. Normalized heads take no norm and no bias, and use
    fused_linear only for logits (its errors are targeted cases)."""
    levels = {k: rng.randrange(len(v)) for k, v in FACTORS.items()}
    if FACTORS["head"][levels["head"]] == "normalized":
        levels["norm"] = 0
        levels["bias"] = 0
        if FACTORS["labels"][levels["labels"]] != "absent":
            levels["impl"] = 0
    return levels


def _pairs(levels: Dict[str, int]) -> set:
    return {((a, levels[a]), (b, levels[b])) for a, b in itertools.combinations(FACTORS, 2)}


def covering_grid(rng: random.Random, count: int) -> List[Case]:
    """Greedy pairwise covering design (AETG-like), continued until `count` cases."""
    feasible = set()
    for _ in range(20000):
        feasible |= _pairs(_random_levels(rng))
    uncovered = set(feasible)
    chosen = []
    while uncovered or len(chosen) < count:
        candidates = [_random_levels(rng) for _ in range(40)]
        best = max(candidates, key=lambda c: len(_pairs(c) & uncovered))
        uncovered -= _pairs(best)
        chosen.append(best)

    cases = []
    for levels in chosen:
        f = {k: FACTORS[k][i] for k, i in levels.items()}
        div = f["div"]
        if div == "number":
            div = rng.choice([2.0, 0.5, 7.0, 3.25, 64.0])
        fused = f["impl"] == "fused_linear"
        cases.append(
            Case(
                head=f["head"],
                norm=f["norm"],
                bias=f["bias"],
                dtype=f["dtype"],
                impl=f["impl"],
                B=rng.choice([2, 3]),
                S=rng.randint(1, 7),
                V=rng.choice([40, 45, 53, 64, 67]),
                labels=f["labels"],
                ignore_index=rng.choice([-100, -100, -100, -1, 0, 5]),
                reduction=f["reduction"],
                zml=f["zml"],
                div=div,
                keep=f["keep"],
                return_logits=f["return_logits"],
                tile_bytes=rng.choice([None, 200, 1000, 2000, 5000]) if fused else None,
            )
        )
    return cases


def targeted_cases() -> List[Case]:
    """Edge cases, every error of docs/SPEC.md §4 / §5, and the deviations of its §9.2."""
    c = []
    add = c.append
    fused = dict(impl="fused_linear")
    # logits_to_keep as an int: Python slice semantics at the edges.
    for k in (1, -1, 4, -4, 6, -6, 9, -9):
        add(Case(S=6, keep=k, return_logits=True, reduction="none", zml=1e-3))
        add(Case(S=6, keep=k, reduction="sum", zml=1e-3, **fused))
    add(Case(S=6, keep=-6, reduction="mean", return_logits=True))  # nothing kept: NaN
    add(Case(S=6, keep=-6, labels="absent"))
    # positions tensors that are fine.
    for head in ("default", "normalized"):
        add(Case(head=head, keep="tensor", reduction="none", zml=1e-4, dtype="bfloat16"))
        add(Case(head=head, keep="tensor_empty", reduction="none", return_logits=True))
        add(Case(head=head, keep="tensor_empty", reduction="mean"))
        add(Case(head=head, keep="tensor", labels="absent", S=7, B=3))
    # Positions upstream rejects (gather/expand errors) and those we reject (docs/SPEC.md §9.2,
    # deviation 2).
    for kind in ("tensor_long", "tensor_1d", "tensor_0d", "tensor_3d", "tensor_oob", "tensor_neg",
                 "tensor_short", "tensor_int32"):
        add(Case(keep=kind, reduction="sum"))
        add(Case(head="normalized", keep=kind, labels="absent"))
    add(Case(keep="tensor_short", reduction="none", **fused))
    add(Case(keep="tensor_oob", reduction="mean", **fused))
    add(Case(keep="tensor_short", B=3, labels="absent", norm=norm("rms")))
    # z-loss multipliers: 0.0 acts as 1e-4, negative is used as given, None hides 1e-4 in fused.
    for zml in (0.0, -1e-3, None, 1e-2):
        for red in ("mean", "sum", "none"):
            add(Case(zml=zml, reduction=red, labels="some_ignored", **fused))
            add(Case(zml=zml, reduction=red, labels="some_ignored", head="normalized"))
    # Ignored labels in every reduction and both implementations.
    for labels in ("all_ignored", "rows_ignored"):
        for red in ("mean", "sum", "none"):
            add(Case(labels=labels, reduction=red, zml=1e-3, **fused))
            add(Case(labels=labels, reduction=red, zml=1e-3, norm=norm("rms"), dtype="bfloat16"))
    add(Case(labels="some_ignored", ignore_index=7, V=40, reduction="none", zml=1e-3))
    add(Case(labels="some_ignored", ignore_index=7, V=40, reduction="sum", zml=1e-3, **fused))
    # Loss div factors: 0-d tensor, zero, and (B, 1) with "none".
    add(Case(div="scalar_tensor", reduction="sum", zml=1e-3))
    add(Case(div="scalar_tensor", reduction="none", zml=1e-3, **fused))
    add(Case(div=0.0, reduction="sum"))
    add(Case(div=0.0, reduction="mean", **fused))
    add(Case(div="tensor", reduction="none", zml=1e-3, B=3, dtype="bfloat16", **fused))
    # Shapes: B = 1, larger S, V a multiple of 8 or tiny, other d_model.
    add(Case(B=1, S=12, keep=5, reduction="none", zml=1e-3, return_logits=True))
    add(Case(B=1, S=12, keep="tensor", reduction="sum", zml=1e-3, **fused))
    add(Case(V=8, D=8, reduction="mean", zml=1e-3, norm=norm("default")))
    add(Case(V=2, reduction="none", zml=1e-3, **fused))
    add(Case(D=12, head="normalized", reduction="sum", zml=1e-3, return_logits=True))
    add(Case(D=24, V=67, norm=norm("qwen_rms"), dtype="bfloat16", reduction="mean", zml=1e-3))
    # float16 heads.
    add(Case(dtype="float16", reduction="mean", zml=1e-3, norm=norm("rms")))
    add(Case(dtype="float16", reduction="sum", zml=1e-3, norm=norm("default"), **fused))
    add(Case(dtype="float16", head="normalized", labels="absent"))
    # fused_linear's tiles: down to one logit per tile, several token rows per tile with a rest,
    # and (V > 1024) vocabulary slices with a remainder.
    for tile in (1, 64, 300, 2000, 5000):
        add(Case(B=3, S=7, reduction="none", zml=1e-3, tile_bytes=tile, **fused))
        add(Case(B=3, S=7, reduction="mean", tile_bytes=tile, dtype="bfloat16", **fused))
    for tile in (20000, 40000, None):
        for dtype in ("float32", "bfloat16"):
            add(Case(B=3, S=7, V=2500, reduction="none", zml=1e-3, tile_bytes=tile, dtype=dtype,
                     labels="some_ignored", norm=norm("rms"), **fused))
            add(Case(B=3, S=7, V=2500, reduction="sum", zml=1e-3, tile_bytes=tile, dtype=dtype,
                     **fused))
    # The per-call implementation override (our extension).
    add(Case(impl_option="fused_linear", reduction="sum", zml=1e-3))
    add(Case(impl="fused_linear", impl_option="default", reduction="none", zml=1e-3,
             return_logits=True))
    add(Case(head="normalized", impl_option="fused_linear", reduction="sum"))
    # Empty inputs: B = 0 and S = 0.
    for red in ("mean", "sum", "none"):
        add(Case(B=0, reduction=red, zml=1e-3))
        add(Case(B=0, reduction=red, zml=1e-3, **fused))
        add(Case(S=0, reduction=red, zml=1e-3, return_logits=True))
        add(Case(S=0, reduction=red, zml=1e-3, **fused))
    add(Case(B=0, head="normalized", reduction="none"))
    add(Case(B=0, labels="absent"))
    # --- docs/SPEC.md §4 errors ---
    # return_logits=False without labels.
    for kw in (dict(), dict(head="normalized"), fused, dict(norm=norm("rms"), keep=-2)):
        add(Case(labels="absent", return_logits=False, **kw))
    # fused_linear with return_logits=True.
    for red, zml in (("mean", None), ("sum", 1e-3), ("none", 1e-4)):
        add(Case(return_logits=True, reduction=red, zml=zml, **fused))
    # normalized with fused_linear and labels (logits alone are fine).
    for red, rl in (("mean", None), ("sum", False), ("none", None)):
        add(Case(head="normalized", reduction=red, return_logits=rl, **fused))
    add(Case(head="normalized", labels="absent", **fused))
    # normalized with a bias or a layer norm.
    add(Case(head="normalized", bias=True))
    add(Case(head="normalized", bias=False))
    add(Case(head="normalized", norm=norm("rms")))
    add(Case(head="normalized", norm=norm("l2_norm"), labels="absent"))
    # l2_norm with options.
    for option, value in (("eps", 1e-6), ("elementwise_affine", True),
                          ("elementwise_affine", False), ("bias", False),
                          ("full_precision", True), ("dtype", "float32")):
        add(Case(norm=norm("l2_norm", **{option: value})))
    # cute_rms / fused_rms construction errors (docs/SPEC.md §5).
    add(Case(norm=norm("fused_rms", elementwise_affine=False)))
    add(Case(norm=norm("fused_rms", full_precision=False), labels="absent"))
    add(Case(norm=norm("cute_rms", full_precision=False)))
    add(Case(norm=norm("cute_rms", full_precision=False, elementwise_affine=False), **fused))
    # Unknown reductions (fused: an error for us, a silent "sum" upstream; docs/SPEC.md §9.2,
    # deviation 1).
    for red in ("avg", "MEAN", ""):
        add(Case(reduction=red))
        add(Case(reduction=red, zml=1e-3, **fused))
    add(Case(reduction="batchmean", head="normalized", zml=1e-3))
    # Labels out of range (fused: undefined upstream, an error for us).
    for bad in (53, 60, -5):
        add(Case(labels="out_of_range", bad_label=bad))
        add(Case(labels="out_of_range", bad_label=bad, reduction="sum", **fused))
    add(Case(labels="out_of_range", bad_label=53, head="normalized", reduction="none"))
    add(Case(labels="out_of_range", bad_label=-100, ignore_index=-1))
    # ... unless logits_to_keep drops them.
    add(Case(labels="out_of_range_dropped", bad_label=70, keep=-1, reduction="none"))
    add(Case(labels="out_of_range_dropped", bad_label=70, keep=2, reduction="sum", **fused))
    # x dtype != head dtype.
    for kw in (dict(x_dtype="bfloat16"), dict(dtype="bfloat16", x_dtype="float32"),
               dict(x_dtype="bfloat16", norm=norm("rms")),
               dict(x_dtype="bfloat16", labels="absent"),
               dict(x_dtype="bfloat16", head="normalized"),
               dict(dtype="bfloat16", x_dtype="float32", norm=norm("l2_norm")),
               dict(x_dtype="float16", **fused)):
        add(Case(**kw))
    return c


def all_cases() -> List[Case]:
    rng = random.Random(SEED)
    cases = targeted_cases() + covering_grid(rng, MIN_CASES)
    return list(dict.fromkeys(cases))  # distinct, in order


# ---------------------------------------------------------------------------------------------
# Materialising a case: the olmo_core head with random weights, and the inputs


def olmo_config(case: Case, impl: Optional[str] = None) -> LMHeadConfig:
    layer_norm = None
    if case.norm is not None:
        options = dict(case.norm)
        name = options.pop("name")
        if name in ("cute_rms", "fused_rms"):  # GPU kernels of the rms math (docs/SPEC.md §5)
            name = "rms"
        if "dtype" in options:
            options["dtype"] = DType(options["dtype"])
        layer_norm = LayerNormConfig(name=LayerNormType(name), **options)
    return LMHeadConfig(
        name=LMHeadType(case.head),
        layer_norm=layer_norm,
        bias=case.bias,
        dtype=DType(case.dtype),
        loss_implementation=LMLossImplementation(impl or case.effective_impl),
    )


def our_config_json(case: Case) -> dict:
    return {
        "name": case.head,
        "layer_norm": None if case.norm is None else dict(case.norm),
        "bias": case.bias,
        "dtype": case.dtype,
        "loss_implementation": case.impl,
    }


def randomize_parameters(head: torch.nn.Module, gen: torch.Generator, d_model: int) -> None:
    """Non-trivial values for every parameter (norm weight/bias, w_out, sz)."""
    with torch.no_grad():
        for name, p in head.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name == "norm.weight":
                v = 1.0 + 0.3 * r
            elif name == "norm.bias":
                v = 0.3 * r
            elif name == "w_out.weight":
                v = 0.4 * r
            elif name == "w_out.bias":
                v = 0.5 * r
            elif name == "sz":
                v = (1.0 + 0.3 * r) / math.sqrt(d_model)
            else:
                raise AssertionError(f"unexpected parameter {name}")
            p.copy_(v.to(p.dtype))


def make_labels(case: Case, gen: torch.Generator) -> Optional[torch.Tensor]:
    if case.labels == "absent":
        return None
    labels = torch.randint(0, case.V, (case.B, case.S), generator=gen)
    ignored = torch.zeros(case.B, case.S, dtype=torch.bool)
    if case.labels == "some_ignored":
        ignored = torch.rand(case.B, case.S, generator=gen) < 0.35
        if case.B > 0 and case.S > 0:
            ignored[0, -1] = False  # at least one valid token
            ignored[-1, 0] = True  # and one ignored
    elif case.labels == "rows_ignored" and case.B > 0:
        ignored[0] = True
    elif case.labels == "all_ignored":
        ignored[:] = True
    labels[ignored] = case.ignore_index
    if case.labels == "out_of_range" and case.B > 0:
        labels[0] = case.bad_label
    elif case.labels == "out_of_range_dropped":
        labels[:, 0] = case.bad_label
    return labels


def make_positions(case: Case, gen: torch.Generator) -> torch.Tensor:
    B, S = case.B, case.S
    K = max(1, S // 2 + 1)
    kind = case.keep

    def rand(rows, k):
        return torch.randint(0, max(S, 1), (rows, k), generator=gen)

    if kind == "tensor":
        return rand(B, int(torch.randint(1, S + 3, (1,), generator=gen)))
    if kind == "tensor_empty":
        return rand(B, 0)
    if kind == "tensor_short":
        return rand(B - 1, K)
    if kind == "tensor_long":
        return rand(B + 1, K)
    if kind == "tensor_1d":
        return rand(1, K)[0]
    if kind == "tensor_0d":
        return torch.tensor(S - 1)
    if kind == "tensor_3d":
        return rand(B, K).unsqueeze(-1)
    if kind == "tensor_int32":
        return rand(B, K).to(torch.int32)
    p = rand(B, K)
    if kind == "tensor_oob":
        p[-1, -1] = S
    elif kind == "tensor_neg":
        p[0, 0] = -1
    else:
        raise AssertionError(kind)
    return p


@dataclasses.dataclass
class Materialized:
    head: Optional[torch.nn.Module]  # None when olmo_core refuses to build it
    build_error: Optional[Exception]
    x: torch.Tensor
    labels: Optional[torch.Tensor]
    keep: Union[int, torch.Tensor]
    div: Union[None, float, torch.Tensor]


def materialize(case: Case, index: int, tmp: Path) -> Tuple[Materialized, dict]:
    """Builds the olmo_core head and the inputs; writes what the runner reads. Returns the
    materialized case and its entry in CASES.json."""
    gen = torch.Generator().manual_seed(SEED * 1000 + index)
    head, build_error = None, None
    try:
        head = olmo_config(case).build(d_model=case.D, vocab_size=case.V)
        randomize_parameters(head, gen, case.D)
    except Exception as e:  # noqa: BLE001 - the reference records what upstream raises
        build_error = e

    x = torch.randn(case.B, case.S, case.D, generator=gen, dtype=torch.float64)
    x = x.to(TORCH_DTYPES[case.x_dtype or case.dtype])
    labels = make_labels(case, gen)
    keep = make_positions(case, gen) if isinstance(case.keep, str) else case.keep
    div = case.div
    if div == "tensor":
        div = 0.5 + 3.5 * torch.rand(case.B, 1, generator=gen)
    elif div == "scalar_tensor":
        div = torch.tensor(3.0)

    stem = tmp / f"{index:04d}"
    weights = f"{stem}.weights.safetensors"
    if head is not None:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, weights)
    inputs = {"x": x}
    if labels is not None:
        inputs["labels"] = labels
    if isinstance(keep, torch.Tensor):
        inputs["logits_to_keep"] = keep
    if isinstance(div, torch.Tensor):
        inputs["loss_div_factor"] = div
    save_file(inputs, f"{stem}.inputs.safetensors")

    options = {
        "ignore_index": case.ignore_index,
        "loss_reduction": case.reduction,
        "z_loss_multiplier": case.zml,
        "loss_div_factor": "tensor" if isinstance(div, torch.Tensor) else div,
        "return_logits": case.return_logits,
        "logits_to_keep": "tensor" if isinstance(keep, torch.Tensor) else keep,
    }
    if case.impl_option is not None:
        options["loss_implementation"] = case.impl_option
    if case.tile_bytes is not None:
        options["logit_tile_bytes"] = case.tile_bytes
    entry = {
        "config": our_config_json(case),
        "d_model": case.D,
        "vocab_size": case.V,
        "weights": weights,
        "inputs": f"{stem}.inputs.safetensors",
        "options": options,
        "output": f"{stem}.output.safetensors",
    }
    return Materialized(head, build_error, x, labels, keep, div), entry


# ---------------------------------------------------------------------------------------------
# References


@dataclasses.dataclass
class Expected:
    source: str  # olmo | fp64 | spec | deviation
    code: str = "OK"  # or the absl status code name we must return
    outputs: Optional[Dict[str, Optional[torch.Tensor]]] = None
    agree: Optional[Dict[str, Optional[torch.Tensor]]] = None  # olmo default path (values only)
    why: str = ""
    # On a GPU: the float64 reference of the same case (device_expectation), for the GPU rule of
    # `compare` and for the error statistics.
    exact: Optional[Dict[str, Optional[torch.Tensor]]] = None


def code_of(e: Exception) -> str:
    if isinstance(e, NotImplementedError):  # before RuntimeError, its base class
        return "UNIMPLEMENTED"
    if isinstance(e, (OLMoConfigurationError, RuntimeError, ValueError, IndexError)):
        return "INVALID_ARGUMENT"
    raise AssertionError(f"unexpected exception from the reference: {e!r}") from e


def as_fields(out) -> Dict[str, Optional[torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return {"logits": out, "loss": None, "ce_loss": None, "z_loss": None}
    return {name: getattr(out, name) for name in FIELDS}


def select_positions(h, labels, keep):
    """LMHead.forward's position selection, as upstream writes it."""
    if isinstance(keep, int):
        if keep != 0:
            h = h[:, -keep:, :]
            labels = None if labels is None else labels[:, -keep:]
    else:
        h = h.gather(1, keep.unsqueeze(-1).expand(-1, -1, h.size(-1)))
        labels = None if labels is None else labels.gather(1, keep)
    return h, labels


def finalize(t: torch.Tensor, B: int, reduction: str, div) -> torch.Tensor:
    """LMHead._finalize_loss without TP/CP."""
    if reduction == "none":
        t = t.view(B, -1)
    if div is not None:
        t = t / div
    return t


def fused_reference(case: Case, m: Materialized, with_agree: bool = True) -> Expected:
    """docs/SPEC.md §2.4 in float64: Liger's fused linear cross-entropy as OLMo-core calls it.
    With `with_agree`, also olmo_core's default path where the two agree."""
    head = m.head
    h = head.norm(m.x) if head.norm is not None else m.x
    h, labels = select_positions(h, m.labels, m.keep)
    W = head.w_out.weight
    b = head.w_out.bias
    if h.dtype != W.dtype:
        raise RuntimeError("mat1 and mat2 must have the same dtype")
    if case.reduction not in ("mean", "sum", "none"):
        return Expected("deviation", "INVALID_ARGUMENT", why="unknown reduction (deviation 1)")
    y = labels.contiguous().view(-1)
    valid = y != case.ignore_index
    if bool((valid & ((y < 0) | (y >= case.V))).any()):
        return Expected("deviation", "INVALID_ARGUMENT", why="fused labels out of range (dev. 3)")
    if y.numel() == 0 and FUSED_EMPTY_IS_ERROR:
        return Expected("deviation", "INVALID_ARGUMENT", why="fused with no tokens (deviation 4)")

    dt = h.dtype
    logits = h.reshape(-1, case.D).double() @ W.double().T
    if b is not None:
        logits = logits + b.double()
    logits = logits.to(dt).double()  # Liger's logits live in the input dtype
    lse = torch.logsumexp(logits, dim=-1)
    n = int(valid.sum())
    s = case.zml or 1e-4
    target = logits.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
    ce_rows = torch.where(valid, lse - target, 0.0)
    z_rows = torch.where(valid, s * lse * lse, 0.0)
    if case.reduction == "mean" and n > 0:
        ce_rows, z_rows = ce_rows / n, z_rows / n
    loss_rows = (ce_rows + z_rows).float()  # z is in the loss whatever the multiplier
    z_rows = z_rows.to(dt)  # Liger stores z in the input dtype
    if case.reduction == "none":
        loss, z = loss_rows, z_rows
    else:
        loss, z = loss_rows.double().sum().float(), z_rows.double().sum().to(dt)
    if case.zml is not None:
        ce = (loss.double() - z.double()).float()
    else:
        ce, z = loss, None
    if case.return_logits is True:
        raise RuntimeError("'return_logits=True' is not compatible 'fused_linear' loss "
                           "implementation")

    B = m.x.shape[0]
    outputs = {
        "logits": None,
        "loss": finalize(loss, B, case.reduction, m.div),
        "ce_loss": finalize(ce, B, case.reduction, m.div),
        "z_loss": None if z is None else finalize(z, B, case.reduction, m.div),
    }
    agree = None
    if with_agree and case.reduction in ("mean", "sum") and case.zml is not None and n > 0:
        default_head = olmo_config(case, impl="default").build(d_model=case.D, vocab_size=case.V)
        default_head.load_state_dict(head.state_dict())
        agree = as_fields(olmo_forward(default_head, case, m, return_logits=False))
    return Expected("fp64", outputs=outputs, agree=agree)


def olmo_forward(head, case: Case, m: Materialized, return_logits="case", grad=False):
    with torch.no_grad() if not grad else torch.enable_grad():
        return head(
            m.x,
            labels=m.labels,
            ignore_index=case.ignore_index,
            loss_reduction=case.reduction,
            z_loss_multiplier=case.zml,
            loss_div_factor=m.div,
            return_logits=case.return_logits if return_logits == "case" else return_logits,
            logits_to_keep=m.keep,
        )


def expectation(case: Case, m: Materialized) -> Expected:
    if m.build_error is not None:
        return Expected("olmo", code_of(m.build_error), why=repr(m.build_error))
    options = dict(case.norm or ())
    name = options.get("name")
    if name == "fused_rms" and options.get("elementwise_affine") is False:
        return Expected("spec", "UNIMPLEMENTED",
                        why="fused_rms needs elementwise_affine (docs/SPEC.md §5)")
    if name in ("cute_rms", "fused_rms") and options.get("full_precision") is False:
        return Expected("spec", "UNIMPLEMENTED",
                        why=f"{name} needs full_precision (docs/SPEC.md §5)")
    keep = m.keep
    if isinstance(keep, torch.Tensor) and keep.dim() == 2 and keep.dtype == torch.int32:
        return Expected("deviation", "INVALID_ARGUMENT", why="int32 positions (deviation 2)")
    if isinstance(keep, torch.Tensor) and keep.dim() == 2 and keep.shape[0] < case.B:
        return Expected("deviation", "INVALID_ARGUMENT", why="positions with < B rows (dev. 2)")
    fused = (case.head == "default" and case.effective_impl == "fused_linear"
             and m.labels is not None)
    try:
        with torch.no_grad():
            if fused:
                return fused_reference(case, m)
            return Expected("olmo", outputs=as_fields(olmo_forward(m.head, case, m)))
    except Exception as e:  # noqa: BLE001 - upstream's error is the reference
        return Expected("fp64" if fused else "olmo", code_of(e), why=f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# On a GPU: upstream itself on the same device


def _on(t, device):
    return t.to(device) if isinstance(t, torch.Tensor) else t


def on_device(m: Materialized, device: str) -> Materialized:
    """A copy of the case with the olmo_core head and every input tensor on `device`."""
    head = None if m.head is None else copy.deepcopy(m.head).to(device)
    return Materialized(head, m.build_error, _on(m.x, device), _on(m.labels, device),
                        _on(m.keep, device), _on(m.div, device))


def _on_cpu(fields: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    return {k: None if v is None else v.detach().cpu() for k, v in fields.items()}


def _cross_entropy_loss_fp64(logits, labels, *, ignore_index=-100, reduction="mean",
                             compute_z_loss=False, z_loss_multiplier=1e-4):
    """olmo_core.nn.functional.cross_entropy_loss with the logits upcast to float64 rather than
    float32 (the same lines otherwise)."""
    logits = logits.double()
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    if not compute_z_loss:
        return loss, None
    z_squared = logits.logsumexp(-1).pow(2)
    mask = labels != ignore_index
    if reduction == "mean":
        z_squared = (z_squared * mask).sum() / mask.sum()
    elif reduction == "sum":
        z_squared = (z_squared * mask).sum()
    return loss, z_loss_multiplier * z_squared


def float64_reference(case: Case, m: Materialized,
                      fused: bool) -> Optional[Dict[str, Optional[torch.Tensor]]]:
    """The case computed in float64 on the CPU from the same (already rounded) weights and
    inputs, with no rounding in between: the head and x converted to float64, then docs/SPEC.md §2.4
    (fused_reference, whose logits and z-loss then stay in float64) or olmo_core's default path
    with its loss in float64 (_cross_entropy_loss_fp64). Exact but for the float32 casts that
    olmo_core makes itself (full-precision layer norms) and the float32 losses of the fused
    reference, both far below the tolerances. None when it cannot run."""
    try:
        head = copy.deepcopy(m.head).double()
        div = m.div.double() if isinstance(m.div, torch.Tensor) else m.div
        m64 = Materialized(head, None, m.x.double(), m.labels, m.keep, div)
        if fused:
            return fused_reference(case, m64, with_agree=False).outputs
        with mock.patch.object(olmo_lm_head, "cross_entropy_loss", _cross_entropy_loss_fp64):
            return as_fields(olmo_forward(head, case, m64))
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None


def _upstream_code(e: Exception) -> str:
    try:
        return code_of(e)
    except AssertionError:  # an exception type the CPU never raises (Triton, CUDA)
        return f"UPSTREAM_{type(e).__name__}"


def device_expectation(case: Case, m: Materialized, device: str) -> Expected:
    """The reference for `case` with our head on `device`: upstream on the same device.

    - Every error (upstream's, docs/SPEC.md §5's, our deviations) is taken from the CPU reference
      and upstream is not run on the device: its CUDA kernels turn labels or positions out of range
      into device-side asserts, which end the process's CUDA context.
    - fused_linear with labels and no tokens: deviation 4 (Liger divides by zero), from fp64.
    - Otherwise olmo_core's head on `device`: its PyTorch path (`olmo@cuda`) or, for
      fused_linear with labels, its Liger path (`liger@cuda`; `liger@cuda+grad` where Liger only
      runs with gradients, see below), whose values we must match; for
      fused mean/sum with a multiplier also its default path on the device (`agree`). `exact` is
      float64_reference.
    """
    cpu = expectation(case, m)
    if cpu.code != "OK":
        return cpu
    fused = cpu.source == "fp64"
    if fused:
        _, labels = select_positions(m.x, m.labels, m.keep)
        if labels.numel() == 0:
            return dataclasses.replace(cpu, source="deviation",
                                       why="fused with no tokens (deviation 4)")
    source = "liger@cuda" if fused else "olmo@cuda"
    g = on_device(m, device)
    try:
        try:
            with torch.no_grad():
                outputs = _on_cpu(as_fields(olmo_forward(g.head, case, g)))
        except AttributeError:
            # Liger-Kernel 0.6.4 fails on a head with a bias when the input needs no gradient
            # (its forward calls .detach() on the bias gradient it did not compute: "'NoneType'
            # object has no attribute 'detach'"). Upstream's path then only runs as in training:
            # x requiring a gradient, which Liger computes alongside; the losses are the same.
            if not (fused and g.head.w_out.bias is not None):
                raise
            source = "liger@cuda+grad"
            x = g.x.detach().clone().requires_grad_(True)
            out = olmo_forward(g.head, case, dataclasses.replace(g, x=x), grad=True)
            outputs = _on_cpu(as_fields(out))
    except Exception as e:  # noqa: BLE001 - upstream on the GPU failed where the CPU did not
        return Expected(source, _upstream_code(e), why=f"on {device}: {type(e).__name__}: {e}")
    agree = None
    if fused and cpu.agree is not None:
        default_head = olmo_config(case, impl="default").build(d_model=case.D, vocab_size=case.V)
        default_head.load_state_dict(m.head.state_dict())
        default_head = default_head.to(device)
        agree = _on_cpu(as_fields(olmo_forward(default_head, case, g, return_logits=False)))
    exact = float64_reference(case, m, fused)
    return Expected(source, outputs=outputs, agree=agree, exact=exact)


def within_fp64_rule(have: torch.Tensor, want: torch.Tensor, exact: torch.Tensor, rtol: float,
                     atol: float) -> bool:
    """The GPU rule, for a value outside the tolerance of upstream's: it passes if ours is
    within the dtype's tolerance of the float64 reference (every element), or no further from
    it than twice upstream's own distance plus atol (max over the elements). Two GPU
    implementations that each round logits to bf16 may round one a unit apart; what must hold
    is that ours is as accurate as upstream. Non-finite values must be identical."""
    h, w, e = have.double(), want.double(), exact.double()
    if h.shape != e.shape or w.shape != e.shape:
        return False
    h_finite, w_finite = torch.isfinite(h), torch.isfinite(w)
    if not torch.equal(h_finite, w_finite):
        return False
    h_odd, w_odd = h[~h_finite], w[~w_finite]  # the same places: NaN for NaN, inf for inf
    if not torch.equal(h_odd.nan_to_num(nan=0.0), w_odd.nan_to_num(nan=0.0)) or not torch.equal(
            h_odd.isnan(), w_odd.isnan()):
        return False
    finite = h_finite & torch.isfinite(e)
    if not finite.any():
        return True
    ours_err = (h - e).abs()[finite]
    if bool((ours_err <= atol + rtol * e.abs()[finite]).all()):
        return True
    return ours_err.max().item() <= 2 * (w - e).abs()[finite].max().item() + atol


def error_stats(case: Case, expected: Expected,
                got: Dict[str, torch.Tensor]) -> Dict[str, Tuple[float, float, float]]:
    """Per output present: (ours vs upstream in units of the dtype's tolerance, i.e.
    max |ours - upstream| / (atol + rtol |upstream|), <= 1 passes; ours' and upstream's
    max-norm relative error against the float64 reference, NaN where there is none)."""
    rtol, atol = TOLERANCES[case.dtype]
    stats = {}
    for name in FIELDS:
        want, have = expected.outputs.get(name), got.get(name)
        if want is None or have is None or want.shape != have.shape or want.numel() == 0:
            continue
        w, h = want.double(), have.double()
        both = torch.isfinite(w) & torch.isfinite(h)
        ratio = ((h - w).abs() / (atol + rtol * w.abs()))[both]
        ratio = ratio.max().item() if ratio.numel() else 0.0
        ours_rel = upstream_rel = float("nan")
        exact = None if expected.exact is None else expected.exact.get(name)
        if exact is not None and exact.shape == want.shape:
            e = exact.double()
            fin = both & torch.isfinite(e)
            scale = e[fin].abs().max().item() if fin.any() else 0.0
            if scale > 0:
                ours_rel = (h - e).abs()[fin].max().item() / scale
                upstream_rel = (w - e).abs()[fin].max().item() / scale
        stats[name] = (ratio, ours_rel, upstream_rel)
    return stats


# ---------------------------------------------------------------------------------------------
# Comparison


def _first_lines(e: Exception) -> str:
    return "; ".join(line for line in str(e).splitlines()[:4] if line.strip())


def compare(case: Case, expected: Expected, got_code: str, message: str,
            load_outputs: Callable[[], Dict[str, torch.Tensor]],
            notes: Optional[List[str]] = None) -> List[str]:
    """Problems found (empty when the case passes). `got_code` is "OK" or a status code name;
    `load_outputs` returns the outputs that are present, by name (called only when both sides
    succeeded). With a float64 reference (`expected.exact`, on a GPU) a value outside the
    tolerance still passes by within_fp64_rule; `notes` then receives what passed that way."""
    if got_code != expected.code:
        return [f"expected {expected.code} ({expected.source}: {expected.why}), "
                f"got {got_code}: {message}"]
    if expected.code != "OK":
        return []
    got = load_outputs()
    unknown = set(got) - set(FIELDS)
    if unknown:
        return [f"unexpected outputs {sorted(unknown)}"]
    rtol, atol = TOLERANCES[case.dtype]
    problems = []
    for name in FIELDS:
        want, have = expected.outputs[name], got.get(name)
        if (want is None) != (have is None):
            problems.append(f"{name}: expected {'absent' if want is None else 'present'}")
            continue
        if want is None:
            continue
        if want.dtype != have.dtype or want.shape != have.shape:
            problems.append(f"{name}: expected {want.dtype}{list(want.shape)}, "
                            f"got {have.dtype}{list(have.shape)}")
            continue
        exact = None if expected.exact is None else expected.exact.get(name)
        try:
            torch.testing.assert_close(have, want, rtol=rtol, atol=atol, equal_nan=True)
        except AssertionError as e:
            if exact is not None and within_fp64_rule(have, want, exact, rtol, atol):
                if notes is not None:
                    notes.append(f"{name} vs {expected.source}: by the fp64 rule")
            else:
                problems.append(f"{name} ({expected.source}): {_first_lines(e)}")
        if expected.agree is not None and name != "logits":
            try:
                torch.testing.assert_close(have, expected.agree[name], rtol=rtol, atol=atol,
                                           equal_nan=True, check_dtype=False)
            except AssertionError as e:
                if exact is not None and within_fp64_rule(have, expected.agree[name], exact,
                                                          rtol, atol):
                    if notes is not None:
                        notes.append(f"{name} vs olmo default path: by the fp64 rule")
                else:
                    problems.append(f"{name} vs olmo default path: {_first_lines(e)}")
    return problems
