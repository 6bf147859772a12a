"""bench/reference_server.py, the server a user would write instead (issue 13's baseline), answers
like lmhead_server: the same weights file served by both, the same calls through the Python
client, the same outputs (OLMo-core's default loss path on the CPU)."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lmhead_client import RemoteLMHead
from server_process import CLIENT, REPO

D, V = 64, 1000


@pytest.fixture
def weights(tmp_path):
    gen = torch.Generator().manual_seed(3)
    path = tmp_path / "head.safetensors"
    save_file({"norm.weight": 1 + 0.1 * torch.randn(D, generator=gen),
               "w_out.weight": torch.randn(V, D, generator=gen) / D ** 0.5}, str(path))
    path.with_suffix(".json").write_text(json.dumps(
        {"name": "default", "layer_norm": {"name": "rms", "eps": 1e-5, "bias": False},
         "bias": False, "dtype": "float32", "loss_implementation": "default"}))
    return path


@pytest.fixture
def reference(weights, tmp_path):
    port_file = tmp_path / "reference.port"
    log = open(tmp_path / "reference.log", "wb")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "bench/reference_server.py"), "--model", f"ref={weights}",
         "--port", "0", "--port_file", str(port_file)],
        stdout=log, stderr=subprocess.STDOUT,
        env={"PYTHONPATH": str(CLIENT), "PATH": "/usr/bin:/bin"})
    deadline = time.monotonic() + 120
    while not port_file.exists():
        assert process.poll() is None, (tmp_path / "reference.log").read_text()
        assert time.monotonic() < deadline, "reference server not serving after 120 s"
        time.sleep(0.1)
    yield f"127.0.0.1:{int(port_file.read_text())}"
    process.terminate()
    assert process.wait(timeout=30) == 0  # SIGTERM stops it gracefully
    log.close()


CALLS = [
    {},
    {"labels": True},
    {"labels": True, "loss_reduction": "sum", "z_loss_multiplier": 1e-3},
    {"labels": True, "loss_reduction": "none", "ignore_index": 5, "return_logits": False},
    {"labels": True, "loss_reduction": "mean", "logits_to_keep": 3, "loss_div_factor": 2.0},
    {"labels": True, "logits_to_keep": "positions", "return_logits": True},
]


@pytest.mark.parametrize("call", range(len(CALLS)))
def test_reference_server_answers_like_lmhead(start_server, weights, reference, call):
    ours = start_server(["--model", f"ref={weights}"])
    rng = np.random.default_rng(call)
    x = rng.standard_normal((2, 7, D), dtype=np.float32)
    kwargs = dict(CALLS[call])
    if kwargs.pop("labels", False):
        labels = rng.integers(0, V, size=(2, 7))
        labels[0, :2] = kwargs.get("ignore_index", -100)
        kwargs["labels"] = labels
    if kwargs.get("logits_to_keep") == "positions":
        kwargs["logits_to_keep"] = np.array([[0, 6], [3, 3]])
    answers = []
    for address in (ours.address, reference):
        with RemoteLMHead(address, timeout=60) as head:
            answers.append(head.forward(x, **kwargs))
            answers.append(head.forward_stream(x, micro_batch_size=1, **kwargs))
    for answer in answers[1:]:
        assert type(answer) is type(answers[0])
        if isinstance(answer, np.ndarray):
            np.testing.assert_allclose(answer, answers[0], rtol=1e-5, atol=1e-5)
            continue
        for field in answer._fields:
            got, want = getattr(answer, field), getattr(answers[0], field)
            assert (got is None) == (want is None), field
            if got is not None:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=field)


def test_reference_server_refuses_what_it_does_not_implement(reference):
    x = np.zeros((1, 2, D), dtype=np.float32)
    with RemoteLMHead(reference, timeout=60) as head:
        assert head.health() == "SERVING"
        with pytest.raises(Exception, match="UNIMPLEMENTED"):
            head.forward(x, labels=np.zeros((1, 2), dtype=np.int64), return_argmax=True)
