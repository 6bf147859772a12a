"""The project's Python venv (tools/venv.sh) as seen from a repository rule."""

def venv_package_dir(rctx, requirements, module):
    """The folder of Python package `module` in the venv; fails, naming tools/setup.sh, without it.

    Reading `requirements` (a label of the pin file that installs `module`) makes Bazel fetch the
    calling repository again when the pins change.
    """
    rctx.read(requirements)
    res = rctx.execute(["bash", str(rctx.path(Label("@//tools:venv.sh"))), "path"])
    if res.return_code != 0:
        fail("tools/venv.sh failed: " + res.stderr)
    python = res.stdout.strip() + "/bin/python"
    res = rctx.execute([python, "-c", "import os, {m}; print(os.path.dirname({m}.__file__))".format(m = module)])
    if res.return_code != 0:
        fail("No {} in the project's venv ({}). Run tools/setup.sh first.\n{}".format(module, python, res.stderr))
    return res.stdout.strip()
