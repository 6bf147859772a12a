"""The Python client installed as users install it, from a clean copy of the checkout into
fresh venvs: `pip install client/python`, `pip wheel client/python` and its wheel, and the
sdist's wheel; each then makes a real call to the real server."""

import zipfile

import pytest

from packaging_helpers import call_with, fresh_venv, pip_env, run

STUBS = ["lmhead_client/_proto/__init__.py", "lmhead_client/_proto/lmhead/__init__.py",
         "lmhead_client/_proto/lmhead/v1/__init__.py",
         "lmhead_client/_proto/lmhead/v1/lmhead_pb2.py",
         "lmhead_client/_proto/lmhead/v1/lmhead_pb2.pyi",
         "lmhead_client/_proto/lmhead/v1/lmhead_pb2_grpc.py"]


def check_call(result: dict, venv_python) -> None:
    """The call went through the installed package and its numbers are the logits' own."""
    assert result["module"].startswith(str(venv_python.parent.parent)), result["module"]
    assert "site-packages" in result["module"]
    assert result["health"] == "SERVING"
    assert (result["model"], result["d_model"], result["vocab_size"]) == ("demo", 64, 1000)
    assert result["logits_shape"] == [2, 3, 1000]
    assert result["ce_loss"] == pytest.approx(result["expected_ce_loss"], rel=1e-5)
    assert result["z_loss"] == pytest.approx(result["expected_z_loss"], rel=1e-4)
    assert result["loss"] == pytest.approx(result["ce_loss"] + result["z_loss"], rel=1e-6)
    assert result["z_loss"] > 0


def test_pip_install_from_a_clean_checkout(clean_tree, installed_python, installed_result):
    check_call(installed_result, installed_python)
    # The stubs went into the installed package, not into the source tree.
    assert not (clean_tree / "client/python/lmhead_client/_proto").exists()
    site = run([installed_python, "-c", "import lmhead_client, os; "
                "print(os.path.dirname(os.path.dirname(lmhead_client.__file__)))"],
               cwd=installed_python.parent, env=pip_env()).stdout.strip()
    for stub in STUBS:
        assert (installed_python.parent.parent / site / stub).is_file(), stub


def wheel_names(wheel) -> set:
    with zipfile.ZipFile(wheel) as archive:
        return {n for n in archive.namelist() if ".dist-info/" not in n}


def test_pip_wheel_and_the_sdist_give_installable_wheels(clean_tree, installed_python,
                                                         installed_result, server, tmp_path):
    project = clean_tree / "client/python"
    run([installed_python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp_path / "wheel",
         project], env=pip_env())
    (wheel,) = (tmp_path / "wheel").glob("lmhead_client-*.whl")
    names = wheel_names(wheel)
    assert set(STUBS) <= names, sorted(names)
    assert "lmhead_client/client.py" in names
    assert not any(n.startswith(("generate_stubs", "setup")) for n in names), sorted(names)

    # The wheel, in a venv of its own, makes the call as the source install did.
    python = fresh_venv(tmp_path / "venv")
    run([python, "-m", "pip", "install", "--quiet", wheel], env=pip_env())
    result = call_with(python, server.address, tmp_path)
    check_call(result, python)
    for key in ("loss", "ce_loss", "z_loss"):
        assert result[key] == installed_result[key], key

    # The sdist carries the .proto files, so a wheel built from it has the same files.
    run([installed_python, "-m", "pip", "install", "--quiet", "build"], env=pip_env())
    run([installed_python, "-m", "build", "--sdist", "-o", tmp_path / "sdist", project],
        env=pip_env())
    (sdist,) = (tmp_path / "sdist").glob("lmhead_client-*.tar.gz")
    run([installed_python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
         tmp_path / "from_sdist", sdist], env=pip_env())
    (wheel_from_sdist,) = (tmp_path / "from_sdist").glob("lmhead_client-*.whl")
    assert wheel_names(wheel_from_sdist) == names
    with zipfile.ZipFile(wheel) as a, zipfile.ZipFile(wheel_from_sdist) as b:
        for stub in STUBS:
            assert a.read(stub) == b.read(stub), stub
