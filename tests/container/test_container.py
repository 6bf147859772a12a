"""The CPU image (deploy/Dockerfile, docs/OPERATIONS.md "Container") under Debian's podman.

Builds localhost/lmhead:cpu with deploy/build_image.sh (or takes LMHEAD_IMAGE as it is), runs it
as an operator would (read-only root, no capabilities, no new privileges), and checks: the server
process runs as uid 10001, the image's libraries are complete, the gRPC health check and the
image's own CLI answer, a forward with labels equals the same call to the server run on the host,
the metrics endpoint counts it, TLS with tokens works from mounted secrets, and SIGTERM stops the
container gracefully with exit status 0. hadolint checks deploy/Dockerfile.

podman runs containers here as root with Debian's runc and the sandbox's limits, on the host's
network (no CNI set-up): every server binds --port=0 and writes its port to a mounted folder.
LMHEAD_SERVER and LMHEAD_CLI name the host's binaries (default: bazel-bin's).
"""

import os
import re
import secrets as secrets_module
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SERVER = Path(os.environ.get("LMHEAD_SERVER", REPO / "bazel-bin/server/lmhead_server"))
CLI = Path(os.environ.get("LMHEAD_CLI", REPO / "bazel-bin/client/lmhead"))
PODMAN = ["podman", "--runtime", "runc"]
# What the sandbox allows (the defaults ask for more open files and processes than it grants).
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"]
# The hardening docs/OPERATIONS.md recommends.
HARDENING = ["--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges"]
# On the host's network: free ports instead of the entry point's fixed 50051 and 9090.
FREE_PORTS = ["--port=0", "--metrics_port=0"]


def run(*args, **kwargs):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)


def make_server_certificate(directory):
    """directory/ca.pem, and server.pem and server.key signed by it (openssl) for the name
    `lmhead` alone, as docs/OPERATIONS.md's certificate holds Service names, not 127.0.0.1."""
    directory.mkdir(parents=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (directory / "ext").write_text("subjectAltName=DNS:lmhead\n")
    for args in (["req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
                  "-subj", "/CN=test-ca"],
                 ["req", *key, "-keyout", "server.key", "-out", "server.csr",
                  "-subj", "/CN=lmhead"],
                 ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                  "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "ext"]):
        result = run("openssl", *args, cwd=directory)
        assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def image():
    if os.environ.get("LMHEAD_IMAGE"):
        return os.environ["LMHEAD_IMAGE"]
    start = time.monotonic()
    built = subprocess.run([REPO / "deploy/build_image.sh", "cpu"], stdout=subprocess.PIPE,
                           text=True, check=True)
    name = built.stdout.strip().splitlines()[-1]
    size = run("podman", "image", "inspect", "--format", "{{.Size}}", name).stdout.strip()
    print(f"\nbuilt {name} in {time.monotonic() - start:.0f} s, {int(size) / 2**20:.0f} MiB")
    return name


class Container:
    """A detached container of `image` on free ports, with `workdir` mounted at /work (the
    port file), server arguments `args` and extra podman `options`; `stop()` sends SIGTERM and
    returns the exit status."""

    def __init__(self, image, workdir, args, options=()):
        self.name = f"lmhead-test-{uuid.uuid4().hex[:12]}"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o777)  # the server runs as uid 10001
        started = run(*PODMAN, "run", "-d", "--name", self.name, "--network=host", *LIMITS,
                      *HARDENING, "-v", f"{workdir}:/work", *options, image,
                      *FREE_PORTS, "--port_file=/work/port", *args)
        assert started.returncode == 0, started.stderr
        port_file = workdir / "port"
        deadline = time.monotonic() + 120
        try:
            while not port_file.exists():
                assert self.state() == "running", f"the container stopped:\n{self.logs()}"
                assert time.monotonic() < deadline, f"no port after 120 s:\n{self.logs()}"
                time.sleep(0.1)
        except AssertionError:
            self.remove()
            raise
        self.port = int(port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"

    def state(self):
        return run("podman", "inspect", "--format", "{{.State.Status}}", self.name).stdout.strip()

    def logs(self):
        result = run("podman", "logs", self.name)
        return result.stdout + result.stderr

    def exec(self, *args):
        return run(*PODMAN, "exec", self.name, *args)

    def pid(self):
        return int(run("podman", "inspect", "--format", "{{.State.Pid}}", self.name).stdout)

    def stop(self):
        run("podman", "stop", "--time", "30", self.name, timeout=60)
        code = run("podman", "inspect", "--format", "{{.State.ExitCode}}", self.name).stdout
        return int(code)

    def remove(self):
        run("podman", "rm", "--force", self.name)


@pytest.fixture
def container(image, tmp_path):
    started = []

    def start(args=(), options=()):
        started.append(Container(image, tmp_path / f"work{len(started)}", args, options))
        return started[-1]

    yield start
    for c in started:
        c.remove()


def wait_serving(health_command, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        result = health_command()
        if result.returncode == 0:
            return result
        assert time.monotonic() < deadline, f"not SERVING: {result.stdout}{result.stderr}"
        time.sleep(0.2)


def write_inputs(directory):
    """Two sequences of 8 hidden states of the demo head (d_model 64, vocab 1000) and labels."""
    rng = np.random.default_rng(7)
    np.save(directory / "hidden.npy", rng.standard_normal((2, 8, 64), dtype=np.float32))
    labels = rng.integers(0, 1000, size=(2, 8), dtype=np.int64)
    labels[0, 0] = -100
    np.save(directory / "labels.npy", labels)


def forward_args(address, directory, inputs="", output="out.safetensors"):
    return ["forward", "--address", address, "--hidden", f"{inputs}hidden.npy",
            "--labels", f"{inputs}labels.npy", "--z_loss_multiplier", "1e-4",
            "--output", f"{directory}/{output}"]


@pytest.fixture(scope="module")
def host_answer(tmp_path_factory):
    """The forward of write_inputs() by the server and the CLI run on the host."""
    work = tmp_path_factory.mktemp("host")
    write_inputs(work)
    port_file = work / "port"
    server = subprocess.Popen([SERVER, "--port=0", f"--port_file={port_file}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert server.poll() is None and time.monotonic() < deadline, "host server failed"
            time.sleep(0.05)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        wait_serving(lambda: run(CLI, "health", "--address", address))
        result = run(CLI, *forward_args(address, work, inputs=f"{work}/"))
        assert result.returncode == 0, result.stderr
    finally:
        server.terminate()
        server.wait(timeout=60)
    return load_file(work / "out.safetensors")


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = run(hadolint, REPO / "deploy/Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_serves_the_demo_head_like_the_host_as_uid_10001(container, host_answer):
    c = container()
    # The server itself, seen from the host: every uid (real, effective, saved, fs) is 10001.
    status = Path(f"/proc/{c.pid()}/status").read_text()
    assert re.search(r"^Uid:\s+10001\s+10001\s+10001\s+10001$", status, re.M), status
    assert c.exec("id", "-u").stdout.strip() == "10001"
    # Every shared library the binaries need is in the image.
    ldd = c.exec("ldd", "/usr/local/bin/lmhead_server", "/usr/local/bin/lmhead")
    assert ldd.returncode == 0 and "not found" not in ldd.stdout, ldd.stdout

    # The image's own CLI: health, then a forward with labels from files in /work.
    assert wait_serving(lambda: c.exec("lmhead", "health", "--address", c.address)).stdout \
        .strip() == "SERVING"
    host_work = c.workdir  # mounted at /work
    write_inputs(host_work)
    for name in ("hidden.npy", "labels.npy"):
        (host_work / name).chmod(0o644)
    result = c.exec("lmhead", *forward_args(c.address, "/work", inputs="/work/"))
    assert result.returncode == 0, result.stdout + result.stderr + c.logs()
    got = load_file(host_work / "out.safetensors")
    assert set(got) == set(host_answer)
    assert got["logits"].shape == (2, 8, 1000)
    for name, want in host_answer.items():
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-6, msg=name)
    assert torch.isfinite(got["loss"]) and got["loss"] > 0

    # The host's CLI reaches it too, and the metrics endpoint counts both forwards.
    result = run(CLI, *forward_args(c.address, host_work, inputs=f"{host_work}/",
                                    output="out2.safetensors"))
    assert result.returncode == 0, result.stderr
    port = re.search(r"metrics at http://[^:]+:(\d+)/metrics", c.logs()).group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as page:
        metrics = page.read().decode()
    assert 'lmhead_request_total{code="OK",method="Forward",model="demo"} 2' in metrics
    assert "lmhead_tokens_total{model=\"demo\"} 32" in metrics

    # SIGTERM: drain, then exit 0.
    assert c.stop() == 0
    logs = c.logs()
    assert "received SIGTERM" in logs and "shut down" in logs, logs


def test_tls_and_tokens_from_mounted_secrets(container, tmp_path):
    secrets = tmp_path / "secrets"
    make_server_certificate(secrets)
    token = secrets_module.token_urlsafe(32)
    (secrets / "tokens").write_text(f"{token}\n")
    (secrets / "client-token").write_text(f"{token}\n")
    (secrets / "wrong-token").write_text(f"{secrets_module.token_urlsafe(32)}\n")
    for name in ("server.key", "tokens"):  # readable by the server's user alone
        os.chown(secrets / name, 10001, 10001)
        (secrets / name).chmod(0o400)
    c = container(["--tls_cert=/secrets/server.pem", "--tls_key=/secrets/server.key",
                   "--auth_token_file=/secrets/tokens", "--allow_insecure=false"],
                  ["-v", f"{secrets}:/secrets:ro"])
    tls = ["--tls_roots", secrets / "ca.pem", "--tls_server_name", "lmhead"]
    wait_serving(lambda: run(CLI, "health", "--address", c.address, *tls))
    assert "security: TLS" in c.logs(), c.logs()
    write_inputs(tmp_path)
    result = run(CLI, *forward_args(c.address, tmp_path, inputs=f"{tmp_path}/"), *tls,
                 "--auth_token_file", secrets / "client-token")
    assert result.returncode == 0, result.stderr
    assert torch.isfinite(load_file(tmp_path / "out.safetensors")["loss"])
    result = run(CLI, *forward_args(c.address, tmp_path, inputs=f"{tmp_path}/"), *tls,
                 "--auth_token_file", secrets / "wrong-token", "--max_attempts", "1")
    assert result.returncode != 0 and "UNAUTHENTICATED" in result.stderr, result.stderr
    # Plaintext does not reach it.
    result = run(CLI, "health", "--address", c.address, "--max_attempts", "1", timeout=60)
    assert result.returncode != 0
    assert c.stop() == 0


def test_allow_insecure_false_refuses_plaintext_on_every_interface(image):
    result = run(*PODMAN, "run", "--rm", "--network=host", *LIMITS, *HARDENING, image,
                 *FREE_PORTS, "--allow_insecure=false", timeout=120)
    assert result.returncode != 0
    assert "--allow_insecure" in result.stdout + result.stderr, result.stdout + result.stderr

