"""Soak test of the real lmhead_server: mixed load for --minutes, the server's RSS, open
descriptors and threads recorded each minute, goals checked at the end (docs/SOAK.md).

    bazel build //server:lmhead_server
    $(tools/venv.sh path)/bin/python tests/soak/soak.py --minutes 65 --out /tmp/soak

The server (--server, else $LMHEAD_SERVER, else bazel-bin/server/lmhead_server) is copied to
--out and started from there on 127.0.0.1 with --port 0; the soak's own code and the Python
client are copied there too. So a rebuild or an edit in the working tree cannot change a
running soak. --workers client processes each run a bounded loop of calls (load.py: valid
unary and streamed forwards checked against golden answers, malformed requests, bytes that
are not protobuf, cancellations, deadlines too short, requests over the limits); every
--kill_every seconds a client process is killed with SIGKILL in the middle of a call. At the
end: health, the golden answers once more, the admission limit (no slot leaked), SIGTERM and
exit status 0.

Goals (exit status 1 when one is missed):
  - no unexpected outcome: every call's status code (and the start of an error's message)
    compared exactly with what docs/API.md states;
  - the server survives the load and the final checks, and exits 0 on SIGTERM;
  - runs of >= 10 minutes: RSS growth < 2% and no growth of open descriptors, each measured on
    the per-minute floors (the least of the minute's samples, taken every 5 s) as the median
    of minutes 5, 6, 7 against the median of the last three minutes.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CLIENT = REPO / "client/python"


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", type=Path, default=Path(os.environ.get(
        "LMHEAD_SERVER", REPO / "bazel-bin/server/lmhead_server")),
        help="lmhead_server binary (default $LMHEAD_SERVER, else bazel-bin/...)")
    parser.add_argument("--minutes", type=int, default=65,
                        help="duration of the load (default 65); below 10 the growth goals "
                             "are skipped")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for soak.csv, summary.txt, failures.txt, server.log and "
                             "the copies (default: a new temporary folder)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="serve this model (repeatable) instead of the demo head")
    parser.add_argument("--server_arg", action="append", default=[],
                        help="one more flag for the server, e.g. --server_arg=--log_format=json")
    parser.add_argument("--workers", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--pause_ms", type=float, default=25,
                        help="each worker's pause between calls (default 25)")
    parser.add_argument("--kill_every", type=float, default=15,
                        help="seconds between client processes killed mid-call (default 15; "
                             "0: none)")
    parser.add_argument("--only", type=lambda text: text.split(","), default=None,
                        metavar="KIND,...", help="run only these kinds of calls (load.WEIGHTS), "
                        "e.g. to find which one makes memory grow")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no_copy", action="store_true",
                        help="run the server binary in place instead of a copy in --out")
    args = parser.parse_args(argv)
    if args.minutes < 1 or args.workers < 1:
        parser.error("--minutes and --workers must be at least 1")
    return args


def ensure_stubs() -> None:
    """Runs client/python/generate_stubs.sh with this interpreter unless the stubs are newer
    than the protos and the generator (as tests/e2e_python does)."""
    sources = [*(REPO / "proto/lmhead/v1").glob("*.proto"), CLIENT / "generate_stubs.py"]
    stub = CLIENT / "lmhead_client/_proto/lmhead/v1/lmhead_pb2_grpc.py"
    if not stub.exists() or stub.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        subprocess.run([str(CLIENT / "generate_stubs.sh")], check=True,
                       env=dict(os.environ, PYTHON=sys.executable))


def snapshot_code(folder: Path) -> Path:
    """Copies harness.py, load.py and the Python client (with its stubs) to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("harness.py", "load.py"):
        shutil.copy2(HERE / name, folder / name)
    shutil.copytree(CLIENT / "lmhead_client", folder / "lmhead_client", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def main(argv: List[str]) -> int:
    args = parse_args(argv)
    out = (args.out or Path(tempfile.mkdtemp(prefix="lmhead-soak-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ensure_stubs()
    # Worker processes (spawned) inherit this sys.path, so they import the snapshot too.
    sys.path.insert(0, str(snapshot_code(out / "code")))
    import harness  # noqa: E402 - the snapshot's

    return harness.run(args, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
