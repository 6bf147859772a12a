"""Fixtures of the Python end-to-end tests: the client's stubs generated, and the real
lmhead_server binary started on a free port.

LMHEAD_SERVER names the binary (default bazel-bin/server/lmhead_server). Prints
`grpc parity: N passed, M failed` in pytest's summary. Run (tools/test.sh does):
  bazel build //server:lmhead_server
  $(tools/venv.sh path)/bin/python -m pytest -q tests/e2e_python
"""

import os
import subprocess
import sys
from typing import List, Optional

import pytest

from server_process import CLIENT, REPO, SERVER, ServerProcess


def _generate_stubs() -> None:
    """Runs generate_stubs.sh unless the stubs are newer than the protos and the generator."""
    sources = [*(REPO / "proto/lmhead/v1").glob("*.proto"), CLIENT / "generate_stubs.py"]
    stub = CLIENT / "lmhead_client/_proto/lmhead/v1/lmhead_pb2_grpc.py"
    if not stub.exists() or stub.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        subprocess.run([str(CLIENT / "generate_stubs.sh")], check=True,
                       env=dict(os.environ, PYTHON=sys.executable))


_generate_stubs()
sys.path.insert(0, str(CLIENT))  # lmhead_client, without installing it
sys.path.insert(0, str(REPO / "tests/parity"))  # parity_cases, shared with tests/parity


@pytest.fixture(scope="session")
def server_binary():
    if not SERVER.exists():
        if "LMHEAD_SERVER" in os.environ:
            pytest.fail(f"LMHEAD_SERVER={SERVER} does not exist")
        pytest.skip(f"{SERVER} is missing: run `bazel build //server:lmhead_server` "
                    "(or set LMHEAD_SERVER)")
    return SERVER


@pytest.fixture
def start_server(server_binary, tmp_path):
    """start_server(args, env=None) -> ServerProcess; every server started is stopped at teardown."""
    servers = []

    def start(args: List[str], env: Optional[dict] = None) -> ServerProcess:
        server = ServerProcess(args, tmp_path / f"server{len(servers)}", env=env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


_SUMMARY = pytest.StashKey[dict]()


@pytest.fixture
def grpc_parity_summary(pytestconfig) -> dict:
    """A dict the gRPC parity test fills with `passed`, `failed` and `skipped` ({reason: n})."""
    return pytestconfig.stash.setdefault(_SUMMARY, {})


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    summary = config.stash.get(_SUMMARY, {})
    if "passed" in summary:
        terminalreporter.write_line(
            f"grpc parity: {summary['passed']} passed, {summary['failed']} failed")
        for reason, count in summary.get("skipped", {}).items():
            terminalreporter.write_line(f"grpc parity: {count} skipped: {reason}")
