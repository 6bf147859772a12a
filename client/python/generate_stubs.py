"""Generates the Python gRPC stubs of every proto/lmhead/v1/*.proto into lmhead_client/_proto/.

The one place the stubs are made: the package build (setup.py's build_py, run by
`pip install client/python` and `pip wheel client/python`) calls generate() for the package it
builds, and generate_stubs.sh runs this file for the source tree (the in-tree tests import the
package from there). Needs grpcio-tools (the build requirement in pyproject.toml; the version
decides which protobuf and grpcio runtimes the stubs need).

    python generate_stubs.py [OUT_DIR]    # default: lmhead_client/_proto beside this file
"""

import re
import shutil
import sys
from pathlib import Path
from typing import List

HERE = Path(__file__).resolve().parent
# The proto package the stubs are generated for, as a folder under the proto root.
PROTO_PACKAGE = "lmhead/v1"
# protoc writes absolute imports between the package's stubs (`from lmhead.v1 import lmhead_pb2
# as ...`); inside lmhead_client._proto they import each other relatively.
_ABSOLUTE_IMPORT = re.compile(r"^from lmhead\.v1 import (\w+) as ", re.MULTILINE)


def find_proto_root(project_dir: Path = HERE) -> Path:
    """The folder holding lmhead/v1/*.proto: `proto/` inside the project (an sdist carries the
    protos there) or the repository's `proto/` two levels up (a checkout's client/python)."""
    candidates = [project_dir / "proto", project_dir.parent.parent / "proto"]
    for root in candidates:
        if any((root / PROTO_PACKAGE).glob("*.proto")):
            return root
    raise FileNotFoundError(
        "lmhead-client: no " + PROTO_PACKAGE + "/*.proto under "
        + " or ".join(str(c) for c in candidates)
        + ": build the package from client/python of an lmhead checkout or from its sdist")


def generate(out_dir: Path, proto_root: Path) -> List[Path]:
    """Replaces `out_dir` with the stubs (_pb2.py, _pb2.pyi, _pb2_grpc.py) of every .proto in
    `proto_root`/lmhead/v1, as the package lmhead_client._proto; returns the files written."""
    from importlib import resources

    from grpc_tools import protoc  # the build requirement

    protos = sorted((proto_root / PROTO_PACKAGE).glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"lmhead-client: no .proto files in {proto_root / PROTO_PACKAGE}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / PROTO_PACKAGE).mkdir(parents=True)
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main(args + [str(p) for p in protos]) != 0:
        raise RuntimeError(f"lmhead-client: protoc failed on {', '.join(map(str, protos))}")

    written = []
    for path in sorted((out_dir / PROTO_PACKAGE).iterdir()):
        if path.suffix in (".py", ".pyi"):
            text = path.read_text()
            path.write_text(_ABSOLUTE_IMPORT.sub(r"from . import \1 as ", text))
            written.append(path)
    names = ", ".join(p.name for p in protos)
    doc = f'"""Generated from {PROTO_PACKAGE}/ ({names}) by generate_stubs.py; do not edit."""\n'
    package = out_dir
    for part in [""] + PROTO_PACKAGE.split("/"):
        package = package / part if part else package
        (package / "__init__.py").write_text(doc)
        written.append(package / "__init__.py")
    return written


if __name__ == "__main__":
    if len(sys.argv) > 2 or sys.argv[1:2] in (["-h"], ["--help"]):
        sys.exit(__doc__)
    target = Path(sys.argv[1]) if len(sys.argv) == 2 else HERE / "lmhead_client" / "_proto"
    generate(target, find_proto_root())
