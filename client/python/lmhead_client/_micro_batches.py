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


class MicroBatchCombiner:
    """Combines the answers to a job's micro-batches, added in order.

    For "mean" and "sum" each micro-batch must have been sent with reduction "sum" and without
    loss_div_factor. `finish()` then returns:
      - logits, argmax and "none" losses concatenated along the batch;
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
        for name in ("logits", "argmax") + LOSS_FIELDS:
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
            if name in ("logits", "argmax") or self.reduction == "none":
                array = np.concatenate([p.array for p in parts], axis=0)
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
