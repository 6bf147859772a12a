"""The build of lmhead-client (metadata: pyproject.toml): generates the gRPC stubs into the
package as it is built, so `pip install client/python` and `pip wheel client/python` work from a
clean checkout (grpcio-tools is a build requirement), and puts the .proto files into the sdist,
whose wheel is then built the same way."""

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import generate_stubs  # noqa: E402  (beside this file; not part of the package)


class BuildPyWithStubs(build_py):
    """build_py, then lmhead_client/_proto generated from the protos: into the build folder,
    or, for an editable install (`pip install -e`), into the source folder it imports from."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            out = HERE / "lmhead_client" / "_proto"
        else:
            out = Path(self.build_lib) / "lmhead_client" / "_proto"
        generate_stubs.generate(out, generate_stubs.find_proto_root(HERE))


class SdistWithProtos(sdist):
    """sdist, with the lmhead/v1/*.proto files it is generated from under proto/."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        root = generate_stubs.find_proto_root(HERE)
        for proto in sorted((root / generate_stubs.PROTO_PACKAGE).glob("*.proto")):
            target = Path(base_dir) / "proto" / proto.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(proto, target)


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProtos})
