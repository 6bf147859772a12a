"""The lm-evaluation-harness model (lmhead_client.lm_eval, issue 14) against lm-eval's own
Hugging Face model (HFLM) over the same model object: a small OLMo-2 built in code from a
transformers Olmo2Config with random weights (no download), a byte-level tokenizer built in code,
and its head (lm_head.weight, model.norm.weight; an RMS norm of the config's rms_norm_eps) served
by the real lmhead_server. loglikelihood and loglikelihood_rolling must equal HFLM's to float32
rounding, and is_greedy must agree."""

import json
import string

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

from lmhead_client.lm_eval import LMHeadLM  # noqa: E402
from server_process import ServerProcess  # noqa: E402

VOCAB = 1000
EPS = 1e-6
MAX_LENGTH = 24  # small, so that rolling windows roll and long contexts are truncated


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per byte (ids 2..257), EOS 0, padding 1."""
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer,
                                                eos_token="<|endoftext|>", pad_token="<|pad|>")


TOKENIZER = _tokenizer()
# The ids of lowercase letters and the space: the only rows of lm_head that are not zero, so
# the greedy token is (almost always) one of them and greedy continuations are text.
TEXT_IDS = sorted(TOKENIZER.convert_tokens_to_ids(
    [TOKENIZER.convert_ids_to_tokens(TOKENIZER.encode(c))[0]
     for c in string.ascii_lowercase + " "]))


def _model() -> transformers.Olmo2ForCausalLM:
    torch.manual_seed(14)
    config = transformers.Olmo2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=EPS, pad_token_id=1, bos_token_id=None, eos_token_id=0,
        tie_word_embeddings=False)
    model = transformers.Olmo2ForCausalLM(config).eval()
    with torch.no_grad():
        # Peaked distributions over the text tokens, and a final norm that is not all ones.
        weight = torch.zeros(VOCAB, 32)
        weight[TEXT_IDS] = torch.randn(len(TEXT_IDS), 32) * 2
        model.lm_head.weight.copy_(weight)
        model.model.norm.weight.copy_(1 + 0.5 * torch.randn(32))
    return model


MODEL = _model()


@pytest.fixture(scope="module")
def server(server_binary, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    path = tmp / "olmo2.safetensors"
    # Hugging Face names, as in the checkpoint; the head of an OLMo-2 model.
    save_file({"lm_head.weight": MODEL.lm_head.weight.detach().contiguous(),
               "model.norm.weight": MODEL.model.norm.weight.detach().contiguous()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({
        "name": "default", "layer_norm": {"name": "rms", "eps": EPS, "bias": False},
        "bias": False, "dtype": "float32"}))
    path_nonorm = tmp / "olmo2_nonorm.safetensors"
    save_file({"lm_head.weight": MODEL.lm_head.weight.detach().contiguous()}, str(path_nonorm))
    path_nonorm.with_suffix(".json").write_text(json.dumps({
        "name": "default", "layer_norm": None, "bias": False, "dtype": "float32"}))
    process = ServerProcess([f"--model=olmo2={path}", f"--model=nonorm={path_nonorm}"],
                            tmp / "server")
    yield process
    assert process.stop() == 0, process.log()[-2000:]


def _greedy_text(context: str, steps: int) -> str:
    """The model's greedy continuation of `context` (HFLM's encoding: EOS first when empty)."""
    ids = TOKENIZER.encode(context) or [TOKENIZER.eos_token_id]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(MODEL(torch.tensor([ids])).logits[0, -1].argmax())
            assert token in TEXT_IDS
            ids.append(token)
            out.append(token)
    return TOKENIZER.decode(out)


def _requests():
    contexts = ["the cat sat on", "a", "", "hello world and more words than max_length allows",
                "question: what is it? answer:", "the cat sat on"]
    pairs = []
    for i, context in enumerate(contexts):
        greedy = _greedy_text(context, 1 + i % 3)
        pairs.append((context, greedy))                     # greedy
        pairs.append((context, greedy[:-1] + ("q" if greedy[-1] != "q" else "z")))  # not
        pairs.append((context, " the mat"))
        pairs.append((context, "x"))                        # one token: HFLM's cache
        pairs.append((context, "y"))
    pairs.append(("the cat sat", " on the mat" * 2))       # truncated from the left
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


DOCUMENTS = ["the quick brown fox jumps over the lazy dog " * 3, "a", "short text",
             "".join(string.ascii_lowercase) * 2]


@pytest.fixture(scope="module")
def reference():
    hf = HFLM(pretrained=MODEL, tokenizer=TOKENIZER, batch_size=4, max_length=MAX_LENGTH)
    requests = _requests()
    rolling = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(DOCUMENTS)]
    return (requests, hf.loglikelihood(requests, disable_tqdm=True),
            rolling, hf.loglikelihood_rolling(rolling, disable_tqdm=True))


def _close(have: float, want: float) -> bool:
    return abs(have - want) <= 1e-4 * abs(want) + 1e-5


@pytest.mark.parametrize("remote_norm", [True, False])
@pytest.mark.parametrize("implementation", ["default", "fused_linear"])
@pytest.mark.parametrize("pack_tokens", [4096, 5])
def test_matches_hflm(server, reference, implementation, pack_tokens, remote_norm):
    requests, want, rolling, want_rolling = reference
    assert any(g for _, g in want) and not all(g for _, g in want)
    lm = LMHeadLM(pretrained=MODEL, tokenizer=TOKENIZER, batch_size=4, max_length=MAX_LENGTH,
                  lmhead_address=server.address,
                  lmhead_model="olmo2" if remote_norm else "nonorm", remote_norm=remote_norm,
                  lmhead_loss_implementation=implementation, pack_tokens=pack_tokens,
                  lmhead_timeout=60)
    got = lm.loglikelihood(requests, disable_tqdm=True)
    assert len(got) == len(want)
    for request, (logprob, greedy), (want_logprob, want_greedy) in zip(requests, got, want):
        assert _close(logprob, want_logprob), (request.args, logprob, want_logprob)
        assert greedy == want_greedy, (request.args, greedy, want_greedy)
    got_rolling = lm.loglikelihood_rolling(rolling, disable_tqdm=True)
    for document, have, expected in zip(DOCUMENTS, got_rolling, want_rolling):
        assert _close(have, expected), (document, have, expected)


def test_registered_and_refusing_what_it_cannot_do(server):
    assert get_model("lmhead") is LMHeadLM
    assert get_model("hf") is HFLM  # lm-eval's own names still resolve
    lm = LMHeadLM(pretrained=MODEL, tokenizer=TOKENIZER, lmhead_address=server.address,
                  lmhead_model="olmo2", lmhead_timeout=60)
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.generate_until([Instance("generate_until", {}, ("a", {}), 0)])
    # The served head must match: a norm when the states are sent before it, none after.
    for model, remote_norm in (("olmo2", False), ("nonorm", True)):
        with pytest.raises(ValueError, match="layer norm"):
            LMHeadLM(pretrained=MODEL, tokenizer=TOKENIZER, lmhead_address=server.address,
                     lmhead_model=model, remote_norm=remote_norm, lmhead_timeout=60)
    with pytest.raises(ValueError, match="batch_size='auto'"):
        LMHeadLM(pretrained=MODEL, tokenizer=TOKENIZER, batch_size="auto",
                 lmhead_address=server.address)
