"""The device-memory gauges (docs/OPERATIONS.md "Metrics") of a CUDA build of the server on this
GPU, and models loaded and unloaded there at run time (docs/API.md "Models at run time"): the
weights' bytes appear in lmhead_device_memory_allocated_bytes when a model loads and leave it
when it is unloaded; the other gauges agree with the CUDA runtime. Skipped without a GPU.

Run on the GPU machine (tools/gpu/test.sh shm does, with the server it builds):
  LMHEAD_SERVER=/tmp/lmhead-build/lmhead_server PYTHONPATH=client/python \\
      python3 -m pytest -q -p no:cacheprovider tests/gpu/test_device_metrics.py
"""

import json
import struct
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests/e2e_python"))  # server_process
sys.path.insert(0, str(REPO / "client/python"))

from lmhead_client import RemoteLMHead  # noqa: E402
from server_process import ServerProcess  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ADMIN = "admin-token-0123456789abcdef"
D, V = 2048, 32768  # a bf16 w_out of 128 MiB


def save_head(path: Path) -> int:
    """Writes a bf16 head without layer norm or bias (safetensors, written by hand) and its
    config; returns the weights' bytes."""
    weight = torch.randn(V, D, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    data = weight.view(torch.int16).numpy().tobytes()
    header = json.dumps({"w_out.weight": {"dtype": "BF16", "shape": [V, D],
                                          "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    path.with_suffix(".json").write_text(json.dumps({"name": "default", "layer_norm": None,
                                                     "bias": False, "dtype": "bfloat16"}))
    return len(data)


def scrape(server) -> dict:
    """The device-memory gauges of cuda:0: "total", "used", "reserved", "allocated"."""
    samples = {}
    for name, value in server.metrics().items():
        if name.startswith("lmhead_device_memory_"):
            assert name.endswith('_bytes{device="cuda:0"}'), name
            samples[name[len("lmhead_device_memory_"):-len('_bytes{device="cuda:0"}')]] = value
    return samples


def test_gauges_follow_models_loaded_and_unloaded(tmp_path):
    repository = tmp_path / "models"
    repository.mkdir()
    weight_bytes = save_head(repository / "big.safetensors")
    (tmp_path / "admins").write_text(ADMIN + "\n")
    server = ServerProcess(["--device", "cuda:0", "--metrics_port", "0", "--admin_token_file",
                            str(tmp_path / "admins"), "--model_repository", str(repository)],
                           tmp_path / "server")
    try:
        before = scrape(server)
        free, total = torch.cuda.mem_get_info(0)
        assert before["total"] == total
        assert before["used"] <= total and before["used"] >= before["reserved"]
        assert 0 < before["allocated"] <= before["reserved"]  # the demo head's weights
        with RemoteLMHead(server.address, auth_token=ADMIN, shared_memory="off") as admin:
            admin.load_model("big", "big.safetensors")
            loaded = scrape(server)
            assert loaded["allocated"] - before["allocated"] >= weight_bytes
            assert loaded["reserved"] >= loaded["allocated"]
            x = torch.randn(2, 16, D)
            with RemoteLMHead(server.address, model="big", shared_memory="off") as user:
                assert user.forward(x).shape == (2, 16, V)
            # The forward leaves cuBLAS's workspace allocated (LibTorch keeps it per stream).
            used = scrape(server)
            admin.unload_model("big")
            unloaded = scrape(server)
            assert used["allocated"] - unloaded["allocated"] >= weight_bytes
            print(f"device memory (bytes): before {before}, loaded {loaded}, after a forward "
                  f"{used}, unloaded {unloaded}")
    finally:
        assert server.stop() == 0, server.log()[-3000:]
