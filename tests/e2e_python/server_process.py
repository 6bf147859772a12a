"""The real lmhead_server binary as a subprocess, for the Python end-to-end tests.

LMHEAD_SERVER names the binary (default bazel-bin/server/lmhead_server).
"""

import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "client/python"
SERVER = Path(os.environ.get("LMHEAD_SERVER", REPO / "bazel-bin/server/lmhead_server"))


class ServerProcess:
    """A running lmhead_server (`binary`, default SERVER) bound to 127.0.0.1 on a free port
    (--port 0 --port_file). `address` is "127.0.0.1:PORT"; `stop()` sends SIGTERM and waits for
    it to exit."""

    def __init__(self, args: List[str], workdir: Path, ready_timeout: float = 180,
                 env: Optional[dict] = None, binary: Optional[Path] = None):
        workdir.mkdir(parents=True, exist_ok=True)
        port_file = workdir / "port"
        self.log_path = workdir / "server.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(binary or SERVER), "--host", "127.0.0.1", "--port", "0", "--port_file",
                 str(port_file),
                 *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + ready_timeout
        while not port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"lmhead_server exited with {self.process.returncode}:\n"
                                   f"{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"lmhead_server not serving after {ready_timeout} s")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{int(port_file.read_text())}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict:
        """One scrape of the server's --metrics_port (0: the port its log names): each sample's
        name with its labels -> its value."""
        port = re.search(r"metrics at http://[^:]+:(\d+)/metrics", self.log()).group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as page:
            text = page.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def stop(self) -> Optional[int]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def run_server_to_exit(args: List[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs lmhead_server with `args` where it is expected to refuse to start."""
    return subprocess.run([str(SERVER), "--host", "127.0.0.1", "--port", "0", *args],
                          capture_output=True, text=True, timeout=timeout)
