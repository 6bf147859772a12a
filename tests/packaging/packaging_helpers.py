"""Helpers of the packaging tests: running commands, fresh venvs, and the call every client
makes to the server."""

import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

# The call every client makes (the installed Python clients; examples/cpp_client's program makes
# it too, test_cpp_workspace.py): a forward with labels of the default model, hidden states (2, 3,
# d_model) holding ((37 i) mod 101 - 50) / 64 for element i, labels (7919 i) mod vocab_size,
# z_loss_multiplier 1e-4. Prints JSON: where lmhead_client was imported from, the health, the
# model, the losses, and the losses recomputed in float64 from the logits the call returned.
CALL_SCRIPT = r'''
import json, sys
import numpy as np
import lmhead_client
from lmhead_client import RemoteLMHead

with RemoteLMHead(sys.argv[1]) as head:
    model = head.get_model()
    B, S, D, V = 2, 3, model.d_model, model.vocab_size
    i = np.arange(B * S * D)
    x = (((37 * i) % 101 - 50) / 64).astype(np.float32).reshape(B, S, D)
    labels = ((7919 * np.arange(B * S)) % V).reshape(B, S)
    out = head.forward(x, labels=labels, z_loss_multiplier=1e-4)
    logits = out.logits.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    print(json.dumps({
        "module": lmhead_client.__file__, "health": head.health(), "model": model.name,
        "d_model": model.d_model, "vocab_size": model.vocab_size,
        "logits_shape": list(out.logits.shape),
        "loss": float(out.loss), "ce_loss": float(out.ce_loss), "z_loss": float(out.z_loss),
        "expected_ce_loss": float((lse - picked).mean()),
        "expected_z_loss": float(1e-4 * (lse ** 2).mean())}))
'''


def run(args, **kwargs) -> subprocess.CompletedProcess:
    """Runs `args`, failing the test with its output when it exits non-zero."""
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited with {result.returncode}:\n"
                    f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result


def fresh_venv(path: Path) -> Path:
    """A new venv at `path` (with pip, no system packages); returns its python."""
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


def pip_env() -> dict:
    """The environment for pip and the venvs' pythons: nothing of this test's own Python."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def call_with(python: Path, address: str, workdir: Path) -> dict:
    """CALL_SCRIPT run by `python` in `workdir` (so nothing is imported from the checkout)."""
    script = workdir / "call.py"
    script.write_text(CALL_SCRIPT)
    return json.loads(run([python, script, address], cwd=workdir, env=pip_env()).stdout)
