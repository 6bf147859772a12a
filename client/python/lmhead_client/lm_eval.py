"""An lm-evaluation-harness model whose LM head runs on an lmhead server (issue 14).

`LMHeadLM` is lm-eval's Hugging Face model (`HFLM`) with its scoring replaced: the trunk of a
causal LM (embeddings and decoder layers) runs locally, and the head (final norm + w_out)
remotely through `RemoteLMHead.score`, which returns each continuation's summed
log-probability and whether it is greedy (segment_ids) instead of vocabulary-sized logits.
Everything else is HFLM's own: tokenization, the context/continuation split, truncation to
max_length, batching, the one-token-continuation cache, and loglikelihood_rolling's windows
(lm_eval.utils.get_rolling_token_windows + make_disjoint_window), so the results equal HFLM's on
the same model to float32 rounding.

The final norm. Hugging Face's Llama-style models (OLMo-2, Llama, Mistral, Qwen2) apply it
inside the base model (`model.model.norm`), so `last_hidden_state` is already normalised, while
an OLMo-core LMHead holds the norm itself. By default (`remote_norm=True`) this model sends the
states *before* the norm (a forward hook makes the norm return its input for the call) and the
server applies norm + w_out: serve the checkpoint's `lm_head.weight` and `model.norm.weight`
with an RMS norm of the config's `rms_norm_eps` (client/python/README.md "Scoring"). With
`remote_norm=False` it sends the normalised states, for a head served without a norm. The
constructor checks the served head against both (d_model, vocab_size, norm or not).

Importing this module registers the model with lm-eval as "lmhead" (after lm-eval's own lazy
registrations, so every other model name still resolves). lm-eval's CLI does not import
plugins, so run it through this module, which does: `python -m lmhead_client.lm_eval run
--model lmhead --model_args pretrained=...,lmhead_address=HOST:PORT --tasks ...`.
"""

from typing import List, Optional, Tuple

import lm_eval.models  # noqa: F401 - lm-eval's lazy registrations first (see above)
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import pad_and_concat
from tqdm import tqdm

from lmhead_client.client import RemoteLMHead

IGNORE_INDEX = -100


@register_model("lmhead")
class LMHeadLM(HFLM):
    """HFLM with the LM head on an lmhead server: loglikelihood and loglikelihood_rolling.

    pretrained, tokenizer, batch_size, max_length, device, dtype, ...: as HFLM (a model name or
      path, or a transformers.PreTrainedModel; a causal LM). batch_size must be a number.
    lmhead_address: the server, "host:port". lmhead_model: the served head (None: the server's
      default). lmhead_timeout: seconds per call (None: none).
    lmhead_loss_implementation: "default" or "fused_linear" (None: the served model's).
    remote_norm: send the states before the final norm, which the server applies (default), or
      after it, for a head served without a norm (see the module's docstring).
    pack_tokens: continuation positions per packed row sent to the server (at least the longest
      continuation): each batch's continuations are packed into rows of this many positions,
      one segment each, and sent by score_stream in micro-batches of rows.

    Thread-safety: as HFLM, one evaluation at a time.
    """

    def __init__(self, pretrained, lmhead_address: str = "127.0.0.1:50051",
                 lmhead_model: Optional[str] = None, lmhead_timeout: Optional[float] = None,
                 lmhead_loss_implementation: Optional[str] = None, remote_norm: bool = True,
                 pack_tokens: int = 4096, **kwargs):
        if str(kwargs.get("batch_size", 1)).startswith("auto"):
            raise ValueError("lmhead: batch_size='auto' is not supported (it measures the full "
                             "local model); give a number")
        if int(pack_tokens) < 1:
            raise ValueError(f"pack_tokens must be positive, got {pack_tokens}")
        super().__init__(pretrained, **kwargs)
        if self.backend != "causal":
            raise ValueError(f"lmhead: only causal LMs have their head served, not "
                             f"'{self.backend}' models")
        self.pack_tokens = int(pack_tokens)
        self.remote_norm = bool(remote_norm)
        self.loss_implementation = lmhead_loss_implementation
        self.head = RemoteLMHead(lmhead_address, model=lmhead_model, timeout=lmhead_timeout)
        self._check_head()

    def _trunk(self) -> Tuple[torch.nn.Module, Optional[torch.nn.Module]]:
        """The base model (embeddings, layers, final norm) and its final norm (None if it has
        no attribute `norm`)."""
        base = self.model.base_model
        norm = getattr(base, "norm", None)
        return base, norm if isinstance(norm, torch.nn.Module) else None

    def _check_head(self) -> None:
        info = self.head.get_model()
        config = self.model.config
        d_model = getattr(config, "hidden_size", None)
        if d_model is not None and info.d_model != d_model:
            raise ValueError(f"lmhead: the served head '{info.name}' takes d_model "
                             f"{info.d_model}, the model's hidden_size is {d_model}")
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and info.vocab_size != vocab:
            raise ValueError(f"lmhead: the served head '{info.name}' has vocab_size "
                             f"{info.vocab_size}, the model {vocab}")
        has_norm = info.config.HasField("layer_norm")
        if self.remote_norm and self._trunk()[1] is None:
            raise ValueError("lmhead: remote_norm=True, but the base model has no final norm "
                             "at .norm to leave to the server; pass remote_norm=False")
        if has_norm != self.remote_norm:
            raise ValueError(
                f"lmhead: the served head '{info.name}' has "
                f"{'a' if has_norm else 'no'} layer norm, but remote_norm={self.remote_norm} "
                f"sends states {'before' if self.remote_norm else 'after'} the model's final "
                "norm; serve the head "
                f"{'with' if self.remote_norm else 'without'} the norm or flip remote_norm")

    def _hidden_states(self, inps: torch.Tensor) -> torch.Tensor:
        """The trunk's output for input ids (B, L): (B, L, hidden), before the final norm when
        remote_norm (the norm then returns its input)."""
        base, norm = self._trunk()
        hook = None
        if self.remote_norm:
            hook = norm.register_forward_hook(lambda module, args, output: args[0])
        try:
            with torch.no_grad(), torch.autocast(
                    device_type=self.device.type, dtype=self.mixed_precision_dtype,
                    enabled=self.mixed_precision_dtype is not None):
                return base(input_ids=inps).last_hidden_state
        finally:
            if hook is not None:
                hook.remove()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              override_bs: Optional[int] = None) -> List[Tuple[float, bool]]:
        """HFLM._loglikelihood_tokens with the trunk here and the head on the server: each
        batch's continuation positions are scored in one score_stream job, one segment per
        request."""
        res = []

        def _collate(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        def _lookup_one_token_cont(req):
            return req[-2] + req[-1][:-1]

        re_ord = Collator(requests, sort_fn=_collate,
                          group_by="contexts" if self.logits_cache else None,
                          group_fn=_lookup_one_token_cont)
        batch_size = self.batch_size  # a number (as HFLM's, which then ignores override_bs)
        pbar = tqdm(total=len(requests), disable=(disable_tqdm or (self.rank != 0)),
                    desc="Running loglikelihood requests")
        for batch in re_ord.get_batched(n=batch_size):
            inps, inplens, cont_toks_list = [], [], []
            for _, context_enc, continuation_enc in batch:
                assert len(context_enc) > 0
                assert len(continuation_enc) > 0
                assert len(continuation_enc) <= self.max_length
                # As HFLM: truncated from the left, the last token not an input.
                inp = torch.tensor((context_enc + continuation_enc)[-(self.max_length + 1):][:-1],
                                   dtype=torch.long, device=self.device)
                inps.append(inp)
                inplens.append(inp.shape[0])
                cont_toks_list.append(continuation_enc)
            padding_len_inp = max(inplens)
            hidden = self._hidden_states(pad_and_concat(padding_len_inp, inps,
                                                        padding_side="right"))
            # (request strings or None, continuation tokens, their states (n, hidden)) in the
            # order the answers go back to re_ord.
            pieces = []
            for (request_str, ctx_tokens, _), states, inplen, cont_toks in zip(
                    batch, hidden, inplens, cont_toks_list):
                ctx_len = inplen + (states.shape[0] - padding_len_inp)
                states = self._select_cont_toks(states, contlen=len(cont_toks), inplen=ctx_len)
                for request_str, cont_toks, states in re_ord.get_cache(
                        req_str=request_str, cxt_toks=ctx_tokens, cont_toks=cont_toks,
                        logits=states.unsqueeze(0)):
                    # The trailing slice, as HFLM (a cached request's continuation may be
                    # shorter than the one computed).
                    pieces.append((request_str, cont_toks, states[0, -len(cont_toks):]))
            for (request_str, _, _), answer in zip(pieces, self._score(pieces)):
                res.append(answer)
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
                pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def _score(self, pieces) -> List[Tuple[float, bool]]:
        """(summed log-probability, is greedy) of each piece's continuation, from one
        score_stream job: the pieces packed in order into rows of at most `pack_tokens`
        positions (the longest piece's, if more), each piece a segment of its row; the rows
        padded to the longest with ignored labels."""
        if not pieces:
            return []
        capacity = max(self.pack_tokens, max(len(cont) for _, cont, _ in pieces))
        rows: List[List[int]] = [[]]  # piece indices per row
        used = [0]  # positions per row
        for i, (_, cont, _) in enumerate(pieces):
            if used[-1] + len(cont) > capacity:
                rows.append([])
                used.append(0)
            rows[-1].append(i)
            used[-1] += len(cont)
        width = max(used)
        states0 = pieces[0][2]
        x = torch.zeros(len(rows), width, states0.shape[-1], dtype=states0.dtype)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)
        where = []  # (row, segment) of each piece
        for r, members in enumerate(rows):
            at = 0
            for segment, i in enumerate(members):
                _, cont, states = pieces[i]
                n = len(cont)
                x[r, at:at + n] = states.to("cpu", copy=False)
                labels[r, at:at + n] = torch.tensor(cont, dtype=torch.long)
                segments[r, at:at + n] = segment
                where.append((r, segment))
                at += n
        scores = self.head.score_stream(x, labels, segment_ids=segments, loss_reduction="sum",
                                        loss_implementation=self.loss_implementation)
        sums = scores.segment_logprob_sums.tolist()
        greedy = scores.segment_is_greedy.tolist()
        return [(float(sums[r][s]), bool(greedy[r][s])) for r, s in where]

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        raise NotImplementedError(
            "lmhead: generate_until is not supported: generation needs a token sampled from "
            "each step's head output, one round trip per token; use lm-eval's 'hf' model for "
            "generative tasks (loglikelihood and loglikelihood_rolling tasks run here)")


def main() -> None:
    """lm-eval's command line with the "lmhead" model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
