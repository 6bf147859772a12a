"""RemoteLMHead.score and score_stream (issue 14) against the real server, every output compared
with a float64 torch reference computed here from the same weights.

The heads have no layer norm and dyadic weights and hidden states (multiples of 1/8 with few
significant bits), so their logits are exact in float32 and bfloat16 whatever the GEMM's shape
or summation order: ranks, top-k ids, argmax and is_greedy must then match the reference
exactly, ties included (duplicate weight rows), and the log-probabilities to float32 rounding.
The server runs with --max_batch_tokens 1 and --allow_shared_memory: no call is packed with
another, so streamed results can be compared with one call's bit for bit, and the shared-memory
modes are exercised on the same server.
"""

import json

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lmhead_client import LMHeadError, RemoteLMHead, Scores
from lmhead_client import _tensors
from lmhead_client._micro_batches import SCORING_FIELDS, MicroBatchCombiner
from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb
from server_process import ServerProcess

D, V = 16, 203  # V is not a multiple of 128 (nor of any tile)
IGNORE = -100
# Rows 3, 7 and 100 are equal and the largest possible logit for all-ones hidden states (ties
# go to 3); row 150 equals row 42.
TIED = (3, 7, 100)
IMPLEMENTATIONS = ("default", "fused_linear")
MODELS = ("fp32", "bf16")
TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _weights():
    gen = torch.Generator().manual_seed(14)
    weight = torch.randint(-3, 4, (V, D), generator=gen).double() / 4
    weight[list(TIED)] = 0.75
    weight[150] = weight[42]
    bias = torch.randint(-4, 5, (V,), generator=gen).double() / 8
    bias[list(TIED)] = 0.5
    bias[150] = bias[42]
    return weight, bias


WEIGHT, BIAS = _weights()


@pytest.fixture(scope="module")
def server(server_binary, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scoring")
    args = ["--allow_shared_memory", "--max_batch_tokens=1"]
    for name in MODELS:
        dtype = TORCH_DTYPE[name]
        tensors = {"w_out.weight": WEIGHT.to(dtype).contiguous()}
        config = {"name": "default", "layer_norm": None, "bias": name == "fp32",
                  "dtype": "float32" if name == "fp32" else "bfloat16"}
        if name == "fp32":
            tensors["w_out.bias"] = BIAS.to(dtype)
        path = tmp / f"{name}.safetensors"
        save_file(tensors, str(path))
        path.with_suffix(".json").write_text(json.dumps(config))
        args.append(f"--model={name}={path}")
    process = ServerProcess(args, tmp / "server")
    yield process
    assert process.stop() == 0, process.log()[-2000:]


def _inputs(B=4, S=9, seed=0, model="fp32"):
    """Dyadic hidden states (one position all ones: tied argmax), labels with ignored ones
    (and labels on the tied rows), and segment ids numbering continuations per row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (B, S, D), generator=gen).float() / 2
    x[0, 1] = 1.0
    x[1, 2] = 1.0
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[torch.rand(B, S, generator=gen) < 0.25] = IGNORE
    labels[0, 1] = 7    # tied with the argmax (3) but not it: rank 1, not greedy
    labels[1, 2] = 3    # the argmax among ties: greedy
    segments = torch.full((B, S), -1)
    segments[0, 1:4] = 0
    segments[0, 5:] = 1
    segments[1, 2] = 2          # continuations 0 and 1 absent in this row
    segments[2] = 0             # the whole row
    # row 3: no continuation at all
    return x.to(TORCH_DTYPE[model]), labels, segments


def _logits(x) -> torch.Tensor:
    """The head's logits in float64 (exact: the data is dyadic)."""
    logits = x.double() @ WEIGHT.T
    return logits + BIAS if x.dtype == torch.float32 else logits


def _reference(x, labels, *, top_k=0, candidates=None, segments=None, keep=0) -> dict:
    """Every scoring output in float64 (ties to the lower id), at the kept positions."""
    logits = _logits(x)
    B, S = labels.shape
    if isinstance(keep, int):
        start = 0 if keep == 0 else (max(S - keep, 0) if keep > 0 else min(-keep, S))
        positions = torch.arange(start, S).expand(B, -1)
    else:
        positions = keep
    pick = lambda t: torch.gather(t, 1, positions)  # noqa: E731
    logits = torch.gather(logits, 1, positions[..., None].expand(-1, -1, V))
    labels = pick(labels)
    scored = labels != IGNORE
    safe = labels.clamp(min=0)
    logp = torch.log_softmax(logits, -1)
    out = {}
    out["label_logprobs"] = torch.where(scored, logp.gather(-1, safe[..., None])[..., 0], 0.0)
    out["entropy"] = -(logp.exp() * logp).sum(-1)
    label_logit = logits.gather(-1, safe[..., None])
    out["label_rank"] = torch.where(scored, 1 + (logits > label_logit).sum(-1), 0)
    if top_k:
        ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :top_k]
        out["top_k_ids"] = ids
        out["top_k_logprobs"] = logp.gather(-1, ids)
    if candidates is not None:
        ids = candidates.expand(B, logits.shape[1], -1) if candidates.dim() == 1 else candidates
        out["candidate_logprobs"] = logp.gather(-1, ids)
    if segments is not None:
        segments = pick(segments)
        groups = int(segments.max()) + 1 if segments.numel() else 0
        greedy = logits.argmax(-1) == labels  # torch.argmax: the first of equal maxima
        sums = torch.zeros(B, groups, dtype=torch.float64)
        counts = torch.zeros(B, groups, dtype=torch.int64)
        all_greedy = torch.ones(B, groups, dtype=torch.bool)
        entropy = torch.zeros(B, groups, dtype=torch.float64)
        for b in range(B):
            for g in range(groups):
                mask = (segments[b] == g) & scored[b]
                sums[b, g] = out["label_logprobs"][b][mask].sum()
                counts[b, g] = int(mask.sum())
                all_greedy[b, g] = bool(greedy[b][mask].all())
                entropy[b, g] = out["entropy"][b][mask].sum()
        out.update(segment_logprob_sums=sums, segment_token_counts=counts,
                   segment_is_greedy=all_greedy, segment_entropy_sums=entropy)
    return out


def _check(scores: Scores, want: dict, what: str) -> None:
    for name in SCORING_FIELDS:
        have = getattr(scores, name)
        if name not in want:
            assert have is None, f"{what}: {name} was not asked for"
            continue
        expected = want[name]
        assert have is not None, f"{what}: {name} missing"
        assert tuple(have.shape) == tuple(expected.shape), f"{what}: {name} {have.shape}"
        if expected.is_floating_point():
            assert have.dtype == torch.float32, f"{what}: {name} {have.dtype}"
            torch.testing.assert_close(have.double(), expected, rtol=1e-5, atol=2e-5,
                                       msg=lambda m: f"{what}: {name}: {m}")
        else:
            assert have.dtype == expected.dtype, f"{what}: {name} {have.dtype}"
            assert torch.equal(have, expected), f"{what}: {name}\n{have}\n{expected}"


# -- Without a server: decoding BOOL, combining micro-batches ---------------------------------


def test_bool_tensors_decode_to_numpy_and_torch_bool():
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_BOOL, shape=[2, 2], data=bytes([1, 0, 0, 1]))
    decoded = _tensors.decode(tensor)
    assert decoded.array.dtype == np.bool_
    np.testing.assert_array_equal(decoded.array, [[True, False], [False, True]])
    as_torch = _tensors.to_user(decoded, as_torch=True)
    assert as_torch.dtype == torch.bool and as_torch.tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError):  # one byte short
        _tensors.decode(pb.Tensor(dtype=pb.DATA_TYPE_BOOL, shape=[5], data=bytes(4)))
    with pytest.raises(TypeError):  # requests carry no booleans
        _tensors.encode(np.zeros(3, dtype=bool))
    # candidate_ids and segment_ids: int64 and int32 as they are.
    for dtype, wire in ((np.int64, pb.DATA_TYPE_INT64), (np.int32, pb.DATA_TYPE_INT32)):
        assert _tensors.encode(np.arange(3, dtype=dtype)).dtype == wire


def _scoring_response(groups: int, rows: int, scored: int) -> pb.ForwardResponse:
    response = pb.ForwardResponse(num_scored_tokens=scored)
    values = {
        "label_logprobs": np.full((rows, 2), -float(groups), np.float32),
        "segment_logprob_sums": np.arange(rows * groups, dtype=np.float32).reshape(rows, groups),
        "segment_token_counts": np.ones((rows, groups), np.int64),
        "segment_is_greedy": np.zeros((rows, groups), np.bool_),
    }
    for name, array in values.items():
        dtype = pb.DATA_TYPE_BOOL if array.dtype == np.bool_ else _tensors._NUMPY_TO_WIRE[
            array.dtype]
        getattr(response.scoring, name).CopyFrom(
            pb.Tensor(dtype=dtype, shape=list(array.shape), data=array.tobytes()))
    return response


def test_combiner_pads_segment_outputs_to_the_jobs_groups():
    combiner = MicroBatchCombiner("sum", None, lambda: "default")
    for groups, rows in ((1, 2), (3, 1), (0, 1)):
        combiner.add(_scoring_response(groups, rows, scored=2))
    got = combiner.finish()
    assert combiner.num_scored_tokens == 6
    assert got["label_logprobs"].array.shape == (4, 2)
    np.testing.assert_array_equal(got["segment_logprob_sums"].array,
                                  [[0, 0, 0], [1, 0, 0], [0, 1, 2], [0, 0, 0]])
    np.testing.assert_array_equal(got["segment_token_counts"].array,
                                  [[1, 0, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(got["segment_is_greedy"].array,
                                  [[0, 1, 1], [0, 1, 1], [0, 0, 0], [1, 1, 1]])
    assert got["segment_is_greedy"].dtype == pb.DATA_TYPE_BOOL


# -- Against the server ------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model", MODELS)
def test_every_output_matches_the_reference(server, model, implementation):
    x, labels, segments = _inputs(model=model)
    gen = torch.Generator().manual_seed(1)
    per_position = torch.randint(0, V, (4, 9, 5), generator=gen)
    per_position[..., 0] = 7  # a tied id
    with RemoteLMHead(server.address, model=model, timeout=60) as head:
        for top_k, candidates, tile in ((64, per_position, None), (1, torch.tensor([150]), None),
                                        (5, torch.arange(0, V, 2), 4096)):
            what = f"{model} {implementation} k={top_k} C={candidates.shape} tile={tile}"
            scores = head.score(x, labels, label_logprobs=True, entropy=True, label_rank=True,
                                top_k=top_k, candidate_ids=candidates, segment_ids=segments,
                                loss_implementation=implementation, logit_tile_bytes=tile,
                                loss_reduction="sum")
            want = _reference(x, labels, top_k=top_k, candidates=candidates, segments=segments)
            _check(scores, want, what)
            assert scores.num_scored_tokens == int((labels != IGNORE).sum()), what
            # The loss is -sum(label log-probabilities) (fused_linear adds 1e-4 lse^2 per scored
            # token without a z-loss multiplier, as upstream: docs/SPEC.md §9.1, item 1).
            loss = -want["label_logprobs"].sum()
            if implementation == "fused_linear":
                lse = torch.logsumexp(_logits(x), -1)
                loss = loss + 1e-4 * (lse ** 2)[labels != IGNORE].sum()
            torch.testing.assert_close(scores.loss.double(), loss, rtol=1e-5, atol=1e-4)
            # The tied position: argmax 3, label 7 ranks 1 and is not greedy.
            assert scores.top_k_ids[0, 1, :min(top_k, 3)].tolist() == list(TIED)[:top_k], what
            assert scores.label_rank[0, 1] == 1 and scores.label_rank[1, 2] == 1, what
            assert scores.segment_is_greedy[1, 2] and not scores.segment_is_greedy[0, 0], what
        # Each output alone, and nothing asked: only the loss.
        for name in ("label_logprobs", "entropy", "label_rank"):
            scores = head.score(x, labels, loss_implementation=implementation, **{name: True})
            _check(scores, {name: _reference(x, labels)[name]}, f"{model} {name} alone")
        scores = head.score(x, labels, loss_implementation=implementation)
        assert all(getattr(scores, name) is None for name in SCORING_FIELDS)
        assert scores.loss is not None and scores.loss.dim() == 0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_logits_to_keep_slices_labels_and_segments(server, implementation):
    x, labels, segments = _inputs(seed=2)
    gen = torch.Generator().manual_seed(3)
    positions = torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(4)])
    args = dict(label_logprobs=True, entropy=True, label_rank=True, top_k=3,
                loss_implementation=implementation)
    with RemoteLMHead(server.address, model="fp32", timeout=60) as head:
        for keep in (3, -2, positions):
            # Segment ids must lie in [0, S'): renumber the kept ones from 0.
            kept_segments = segments.clamp(max=1)
            per_position = torch.randint(0, V, (4, 3 if isinstance(keep, int) and keep == 3
                                                else (7 if isinstance(keep, int) else 4), 2),
                                         generator=gen)
            scores = head.score(x, labels, logits_to_keep=keep, segment_ids=kept_segments,
                                candidate_ids=per_position, **args)
            want = _reference(x, labels, top_k=3, candidates=per_position,
                              segments=kept_segments, keep=keep)
            _check(scores, want, f"{implementation} logits_to_keep={keep}")


def test_without_labels(server):
    x, _, _ = _inputs(seed=4)
    with RemoteLMHead(server.address, model="fp32", timeout=60) as head:
        want = _reference(x, torch.zeros(4, 9, dtype=torch.long), top_k=4,
                          candidates=torch.tensor([1, 7]))
        del want["label_logprobs"], want["label_rank"]
        for implementation in IMPLEMENTATIONS:
            scores = head.score(x, entropy=True, top_k=4, candidate_ids=torch.tensor([1, 7]),
                                loss_implementation=implementation)
            _check(scores, want, f"no labels {implementation}")
            assert scores.loss is None and scores.num_scored_tokens == 0
        # numpy in, numpy out; int32 candidates.
        scores = head.score(x.numpy(), entropy=True, top_k=2,
                            candidate_ids=np.array([1, 7], dtype=np.int32))
        assert isinstance(scores.entropy, np.ndarray) and scores.entropy.dtype == np.float32
        assert scores.top_k_ids.dtype == np.int64
        np.testing.assert_allclose(scores.entropy, want["entropy"].numpy(), rtol=1e-5, atol=2e-5)
        for name in ("label_logprobs", "label_rank"):
            with pytest.raises(ValueError, match=f"^scoring: {name} needs labels"):
                head.score(x, **{name: True})
        with pytest.raises(ValueError, match="^scoring: segment_ids needs labels"):
            head.score(x, segment_ids=torch.zeros(4, 9, dtype=torch.long))
        with pytest.raises(TypeError, match="return_logits"):
            head.score(x, entropy=True, return_logits=True)
        with pytest.raises(TypeError, match="score_stream"):
            head.forward_stream(x, top_k=3)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_score_stream_equals_one_call(server, implementation):
    """Micro-batches of 1, 2 and 3 rows (so each has another G), over 1 and 3 streams, inline
    and through shared memory: the same bits as one call."""
    x, labels, segments = _inputs(B=5, seed=5)
    segments[4] = -1
    segments[4, 3] = 6  # the job's largest id, in the last micro-batch
    gen = torch.Generator().manual_seed(6)
    per_position = torch.randint(0, V, (5, 9, 3), generator=gen)
    args = dict(label_logprobs=True, entropy=True, label_rank=True, top_k=8,
                candidate_ids=per_position, segment_ids=segments,
                loss_implementation=implementation)
    with RemoteLMHead(server.address, model="fp32", timeout=60, shared_memory="off") as head:
        for reduction in ("mean", "sum", "none"):
            one = head.score(x, labels, loss_reduction=reduction, **args)
            assert one.segment_logprob_sums.shape == (5, 7)
            for size in (1, 2, 3):
                for streams in (1, 3):
                    streamed = head.score_stream(x, labels, loss_reduction=reduction,
                                                 micro_batch_size=size, parallel_streams=streams,
                                                 **args)
                    _same(streamed, one, f"{reduction} size={size} streams={streams}")
        # Positions kept by a (B, K) tensor and no labels: split with the rows as well.
        positions = torch.tensor([[0, 4, 8]] * 5)
        one = head.score(x, entropy=True, top_k=2, logits_to_keep=positions,
                         candidate_ids=per_position[:, :3], loss_implementation=implementation)
        streamed = head.score_stream(x, entropy=True, top_k=2, logits_to_keep=positions,
                                     candidate_ids=per_position[:, :3], micro_batch_size=2,
                                     loss_implementation=implementation)
        _same(streamed, one, "no labels, positions")
    for mode in ("on", "auto"):
        with RemoteLMHead(server.address, model="fp32", timeout=60, shared_memory=mode) as head:
            one = head.score(x, labels, **args)
            streamed = head.score_stream(x, labels, micro_batch_size=2, **args)
            _same(streamed, one, f"shared_memory={mode}")
            if mode == "on":
                assert head.shared_memory_active
            with RemoteLMHead(server.address, model="fp32", timeout=60,
                              shared_memory="off") as inline:
                _same(one, inline.score(x, labels, **args), f"shared_memory={mode} vs inline")


def test_shared_memory_auto_for_a_large_call(server):
    """A call over 1 MiB goes through shared memory in "auto"; its scores still come inline."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randint(-2, 3, (8, 2048, D), generator=gen).float() / 2  # 1 MiB
    labels = torch.randint(0, V, (8, 2048), generator=gen)
    segments = torch.arange(2048).expand(8, -1) // 512
    args = dict(label_logprobs=True, top_k=2, segment_ids=segments,
                loss_implementation="fused_linear")
    with RemoteLMHead(server.address, model="fp32", timeout=60) as head:
        shared = head.score(x, labels, **args)
        assert head.shared_memory_active
    with RemoteLMHead(server.address, model="fp32", timeout=60, shared_memory="off") as head:
        _same(shared, head.score(x, labels, **args), "auto vs off")
    rows = Scores(**{name: None if value is None or name == "loss" else value[:2]
                     for name, value in shared._asdict().items() if name != "num_scored_tokens"})
    want = _reference(x[:2], labels[:2], top_k=2, segments=segments[:2])
    del want["entropy"], want["label_rank"]
    _check(rows, want, "auto")


def _same(got: Scores, want: Scores, what: str) -> None:
    """The same bits, but for a "mean" or "sum" loss: combined from the micro-batches' sums, it
    equals one call's up to summation order (forward_stream's rule)."""
    assert type(got) is Scores, what
    assert got.num_scored_tokens == want.num_scored_tokens, what
    for name in Scores._fields[:-1]:
        have, expected = getattr(got, name), getattr(want, name)
        assert (have is None) == (expected is None), f"{what}: {name}"
        if name == "loss" and expected is not None and expected.dim() == 0:
            torch.testing.assert_close(have, expected, rtol=2e-6, atol=1e-6, equal_nan=True)
        elif expected is not None:
            assert have.dtype == expected.dtype and have.shape == expected.shape, f"{what}: {name}"
            assert torch.equal(have, expected) or (
                have.is_floating_point() and torch.equal(have.isnan(), expected.isnan())
                and torch.equal(have[~have.isnan()], expected[~expected.isnan()])), (
                f"{what}: {name}\n{have}\n{expected}")


BAD = [
    (dict(top_k=65), "options.scoring.top_k"),
    (dict(top_k=-1), "options.scoring.top_k"),
    (dict(candidate_ids=torch.tensor([0, V])), "options.scoring.candidate_ids"),
    (dict(candidate_ids=torch.tensor([-1])), "options.scoring.candidate_ids"),
    (dict(candidate_ids=torch.zeros(0, dtype=torch.long)), "options.scoring.candidate_ids"),
    (dict(candidate_ids=torch.zeros(4, 2, dtype=torch.long)), "options.scoring.candidate_ids"),
    (dict(candidate_ids=torch.zeros(2, 9, 1, dtype=torch.long)),
     "options.scoring.candidate_ids"),
    (dict(candidate_ids=torch.zeros(2, dtype=torch.float32)), "options.scoring.candidate_ids"),
    (dict(segment_ids=torch.zeros(4, 8, dtype=torch.long)), "options.scoring.segment_ids"),
    (dict(segment_ids=torch.full((4, 9), 9)), "options.scoring.segment_ids"),
    (dict(segment_ids=torch.full((4, 9), -2)), "options.scoring.segment_ids"),
    (dict(segment_ids=torch.full((4, 9), 3), logits_to_keep=3), "options.scoring.segment_ids"),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bad_inputs_are_invalid_argument_naming_the_field(server, implementation):
    x, labels, _ = _inputs(seed=7)
    with RemoteLMHead(server.address, model="fp32", timeout=60) as head:
        for kwargs, field in BAD:
            for call in (head.score, head.score_stream):
                candidates = kwargs.get("candidate_ids")
                if (call == head.score_stream and candidates is not None
                        and candidates.dim() == 3 and len(candidates) != len(x)):
                    # Rows that cannot be split with the job's: refused before sending.
                    with pytest.raises(ValueError, match="^candidate_ids: .* 4 rows"):
                        call(x, labels, loss_implementation=implementation, **kwargs)
                    continue
                with pytest.raises(LMHeadError) as error:
                    call(x, labels, loss_implementation=implementation, **kwargs)
                assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT, (kwargs, error.value)
                assert error.value.details.startswith(field), (kwargs, error.value.details)


def test_streamed_rows_must_be_the_jobs(server):
    """A streamed job's per-row arguments with more or fewer rows than the hidden states are
    refused before anything is sent (one call would be refused by the server; split into
    micro-batches, extra rows would be dropped silently)."""
    x, labels, _ = _inputs(seed=8)
    rows = len(x)
    with RemoteLMHead(server.address, model="fp32", timeout=60) as head:
        cases = [("labels", dict(labels=torch.cat([labels, labels[:1]]))),
                 ("segment_ids", dict(labels=labels, segment_ids=torch.zeros(
                     rows - 1, x.shape[1], dtype=torch.long))),
                 ("logits_to_keep", dict(labels=labels, logits_to_keep=torch.zeros(
                     rows + 1, 2, dtype=torch.long)))]
        for name, kwargs in cases:
            with pytest.raises(ValueError, match=f"^{name}: .*the job's {rows} rows"):
                head.score_stream(x, **kwargs, micro_batch_size=1, label_logprobs=True)
            if name != "segment_ids":
                with pytest.raises(ValueError, match=f"^{name}: .*the job's {rows} rows"):
                    head.forward_stream(x, **kwargs, micro_batch_size=1)
