"""The rule that combines the answers to a job's micro-batches into what one forward call over
the whole job returns (docs/API.md, "Combining micro-batches"). The C++ client's
MicroBatchCombiner (client/micro_batches.h) follows the same rule; both are tested against
tests/data/micro_batch_vectors.json.
"""

from typing import Callable, Dict, List, Optional

import numpy as np

from lmhead_client import _tensors
from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb

LOSS_FIELDS = ("loss", "ce_loss", "z_loss")
# ForwardResponse.scoring's tensors (ScoringOutputs), by how micro-batches combine: per kept
# position, (B, S', ...), and per continuation, (B, G).
POSITION_SCORING_FIELDS = ("label_logprobs", "entropy", "label_rank", "top_k_ids",
                           "top_k_logprobs", "candidate_logprobs")
SEGMENT_SCORING_FIELDS = ("segment_logprob_sums", "segment_token_counts", "segment_is_greedy",
                          "segment_entropy_sums")
SCORING_FIELDS = POSITION_SCORING_FIELDS + SEGMENT_SCORING_FIELDS
# What a continuation that no position of a row has looks like in one call (count 0, sums 0,
# greedy vacuously): a micro-batch's (B, G) outputs are padded with it to the job's G.
_ABSENT_SEGMENT = {"segment_logprob_sums": 0.0, "segment_token_counts": 0,
                   "segment_is_greedy": True, "segment_entropy_sums": 0.0}
_CONCATENATED = ("logits", "argmax") + POSITION_SCORING_FIELDS


class MicroBatchCombiner:
    """Combines the answers to a job's micro-batches, added in order.

    For "mean" and "sum" each micro-batch must have been sent with reduction "sum" and without
    loss_div_factor. `finish()` then returns:
      - logits, argmax, "none" losses and the per-position scoring outputs concatenated along
        the batch;
      - the per-continuation scoring outputs (B, G) concatenated along the batch after padding
        each micro-batch's to the job's G (the largest) as one call has an absent continuation:
        count 0, sums 0, is_greedy true;
      - num_scored_tokens added up;
      - "sum": S / d, "mean": S / n / d, with S the float64 sum of the micro-batches' sums, n the
        scored tokens and d the loss_div_factor (IEEE division: dividing by 0 gives inf or NaN);
        a mean over n = 0 scored tokens is NaN for the default implementation and 0 for
        fused_linear (asked of `implementation` only then), as upstream; each result is rounded
        to float32 and then to the dtype the micro-batches answered in.
    """

    def __init__(self, reduction: str, loss_div_factor: Optional[float],
                 implementation: Callable[[], str]):
        self.reduction = reduction
        self.loss_div_factor = loss_div_factor
        self.implementation = implementation
        self.parts: Dict[str, List[_tensors.Decoded]] = {}
        self.num_scored_tokens = 0

    def add(self, response: pb.ForwardResponse,
            outputs: Optional[Dict[str, _tensors.Decoded]] = None) -> None:
        """Adds the next micro-batch's answer; `outputs`: its tensors already decoded (by name;
        default: decoded from the response)."""
        self.num_scored_tokens += response.num_scored_tokens
        if outputs is None:
            outputs = {name: _tensors.decode(getattr(response, name))
                       for name in ("logits", "argmax") + LOSS_FIELDS if response.HasField(name)}
            outputs.update(decode_scoring(response))
        for name in ("logits", "argmax") + LOSS_FIELDS + SCORING_FIELDS:
            if name in outputs:
                decoded = outputs[name]
                earlier = self.parts.setdefault(name, [])
                if earlier and earlier[0].dtype != decoded.dtype:
                    raise ValueError(f"{name}: micro-batch {len(earlier)} answered in another "
                                     "dtype")
                earlier.append(decoded)

    def finish(self) -> Dict[str, _tensors.Decoded]:
        """The combined outputs by name (absent ones left out)."""
        combined = {}
        for name, parts in self.parts.items():
            dtype = parts[0].dtype
            if name in _CONCATENATED or (name in LOSS_FIELDS and self.reduction == "none"):
                array = np.concatenate([p.array for p in parts], axis=0)
            elif name in SEGMENT_SCORING_FIELDS:
                groups = max(p.array.shape[1] for p in parts)
                array = np.concatenate(
                    [np.pad(p.array, ((0, 0), (0, groups - p.array.shape[1])),
                            constant_values=_ABSENT_SEGMENT[name]) for p in parts], axis=0)
            else:
                array = _tensors.round_to(np.asarray(self._scalar(parts), dtype=np.float32),
                                          dtype)
            combined[name] = _tensors.Decoded(array, dtype)
        return combined

    def _scalar(self, parts: List[_tensors.Decoded]) -> np.float64:
        # IEEE arithmetic: inf - inf and 0 / 0 are NaN, x / 0 is an infinity, without warnings.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            total = np.float64(0.0)
            for part in parts:
                total += np.float64(part.array.reshape(()))
            if self.reduction == "mean":
                if self.num_scored_tokens > 0:
                    total = total / np.float64(self.num_scored_tokens)
                else:
                    total = np.float64(0.0 if self.implementation() == "fused_linear"
                                       else np.nan)
            if self.loss_div_factor is not None:
                total = total / np.float64(self.loss_div_factor)
        return total


def decode_scoring(response: pb.ForwardResponse) -> Dict[str, _tensors.Decoded]:
    """ForwardResponse.scoring's tensors by name (always in the response: OutputRegions has no
    field for them)."""
    if not response.HasField("scoring"):
        return {}
    return {name: _tensors.decode(getattr(response.scoring, name))
            for name in SCORING_FIELDS if response.scoring.HasField(name)}
