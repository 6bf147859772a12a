"""Models at run time (lmhead.v1.ModelAdminService) against the real server: LoadModel and
UnloadModel with an administrator's token while the server serves; ListModels follows; the new
models answer as olmo_core's LMHead does; streams running on a model being unloaded or replaced
finish on it; a file that fails to load leaves the server as it was, with the error returned."""

import json
import os
import subprocess
import threading
import time

import grpc
import pytest
import torch
from safetensors.torch import save_file

from lmhead_client import LMHeadError, RemoteLMHead, _tensors
from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb
from lmhead_client._proto.lmhead.v1 import lmhead_pb2_grpc as pb_grpc
from olmo_core.nn.layer_norm import LayerNormConfig, LayerNormType
from olmo_core.nn.lm_head import LMHeadConfig
from parity_cases import TOLERANCES
from server_process import REPO, ServerProcess

USER = "user-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
D, V = 24, 131
CLI = REPO / "bazel-bin/client/lmhead"


def head_for(seed):
    """An olmo_core head (rms layer norm, no bias) seeded with `seed`, and our config JSON."""
    torch.manual_seed(seed)
    config = LMHeadConfig(layer_norm=LayerNormConfig(name=LayerNormType.rms, bias=False),
                          bias=False)
    return config.build(d_model=D, vocab_size=V), {
        "name": "default", "layer_norm": {"name": "rms", "bias": False}, "bias": False}


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """A model repository: heads/a and heads/b (with their configs), and files that must fail."""
    root = tmp_path_factory.mktemp("repository")
    (root / "heads").mkdir()
    heads = {}
    for name, seed in (("a", 1), ("b", 2)):
        head, config = head_for(seed)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()},
                  str(root / "heads" / f"{name}.safetensors"))
        (root / "heads" / f"{name}.json").write_text(json.dumps(config))
        heads[name] = head
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (root / "corrupt.json").write_text(json.dumps(config))
    # Weights without a configuration beside them (and no --head_config on the server).
    (root / "noconfig.safetensors").write_bytes((root / "heads/a.safetensors").read_bytes())
    outside = root.parent / f"{root.name}-outside.safetensors"
    outside.write_bytes((root / "heads/a.safetensors").read_bytes())
    os.symlink(outside, root / "escape.safetensors")
    return root, heads


def start(tmp_path, repository=None, admin=True, name="server"):
    users, admins = tmp_path / "users", tmp_path / "admins"
    users.write_text(USER + "\n")
    admins.write_text(ADMIN + "\n")
    args = ["--auth_token_file", str(users), f"--demo_d_model={D}", f"--demo_vocab_size={V}"]
    if admin:
        args += ["--admin_token_file", str(admins)]
    if repository is not None:
        args += ["--model_repository", str(repository)]
    return ServerProcess(args, tmp_path / name)


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    process = start(tmp_path_factory.mktemp("admin"), repository[0])
    yield process
    assert process.stop() == 0, process.log()[-3000:]


def job(seed=0, B=8, S=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, D, generator=gen), torch.randint(0, V, (B, S), generator=gen)


def assert_matches(output, head, x, labels):
    """The server's answer equals olmo_core's LMHead on the same weights, fp32 tolerances."""
    rtol, atol = TOLERANCES["float32"]
    with torch.no_grad():
        want = head(x, labels=labels, loss_reduction="none", return_logits=True)
    torch.testing.assert_close(output.logits, want.logits, rtol=rtol, atol=atol)
    torch.testing.assert_close(output.loss, want.loss, rtol=rtol, atol=atol)


def names(client):
    return sorted(model.name for model in client.list_models())


def test_load_forward_unload(server, repository):
    _, heads = repository
    x, labels = job()
    with RemoteLMHead(server.address, auth_token=ADMIN) as admin, \
            RemoteLMHead(server.address, auth_token=USER, model="a") as user:
        assert names(user) == ["demo"]
        info = admin.load_model("a", "heads/a.safetensors")
        assert (info.name, info.d_model, info.vocab_size) == ("a", D, V)
        assert info.source == "a.safetensors"  # the file's name, not the host's path
        assert names(user) == ["a", "demo"]
        assert user.get_model("a").version == info.version
        assert_matches(user.forward(x, labels=labels, loss_reduction="none"), heads["a"], x,
                       labels)
        assert user.list_models() and admin.unload_model("a") is None
        assert names(user) == ["demo"]
        with pytest.raises(LMHeadError) as error:
            user.forward(x, labels=labels)
        assert error.value.code == grpc.StatusCode.NOT_FOUND
        assert error.value.details.startswith("model: no model named 'a'")
        with pytest.raises(LMHeadError) as error:
            admin.unload_model("a")
        assert error.value.code == grpc.StatusCode.NOT_FOUND
        assert error.value.details.startswith("name: ")


def test_replace_keeps_the_name_and_changes_the_weights(server, repository):
    _, heads = repository
    x, labels = job(seed=1)
    with RemoteLMHead(server.address, auth_token=ADMIN) as admin, \
            RemoteLMHead(server.address, auth_token=USER, model="m") as user:
        first = admin.load_model("m", "heads/a.safetensors")
        with pytest.raises(LMHeadError) as error:
            admin.load_model("m", "heads/b.safetensors")
        assert error.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert "replace" in error.value.details
        assert_matches(user.forward(x, labels=labels, loss_reduction="none"), heads["a"], x,
                       labels)
        second = admin.load_model("m", "heads/b.safetensors", replace=True)
        assert second.version != first.version
        assert user.get_model().version == second.version
        assert_matches(user.forward(x, labels=labels, loss_reduction="none"), heads["b"], x,
                       labels)
        admin.unload_model("m")


@pytest.mark.parametrize("change", ["unload", "replace"])
def test_a_running_stream_finishes_on_its_model(server, repository, change):
    """A stream opened before the model is unloaded (or replaced) runs every micro-batch on the
    model it was opened with; calls made after the change see the change."""
    _, heads = repository
    x, labels = job(seed=2, B=12)
    with RemoteLMHead(server.address, auth_token=ADMIN) as admin, \
            RemoteLMHead(server.address, auth_token=USER, model="s") as user:
        admin.load_model("s", "heads/a.safetensors")
        stream = user.iter_forward_stream(x, labels=labels, loss_reduction="none",
                                          micro_batch_size=1)
        outputs = [next(stream)]
        if change == "unload":
            admin.unload_model("s")
        else:
            admin.load_model("s", "heads/b.safetensors", replace=True)
        outputs += list(stream)
        assert len(outputs) == 12
        for row, output in enumerate(outputs):
            assert (output.start, output.stop) == (row, row + 1)
            assert_matches(output.output, heads["a"], x[row:row + 1], labels[row:row + 1])
        if change == "unload":
            with pytest.raises(LMHeadError) as error:
                user.forward(x, labels=labels)
            assert error.value.code == grpc.StatusCode.NOT_FOUND
        else:
            assert_matches(user.forward(x, labels=labels, loss_reduction="none"), heads["b"], x,
                           labels)
            admin.unload_model("s")


def test_calls_during_replacements_answer_from_the_version_they_name(server, repository):
    """Callers hammer model "r" while an administrator replaces it back and forth: every answer
    is exactly the head of the version it names (ForwardResponse.model_version; a batch never
    mixes the two), and none fails."""
    _, heads = repository
    rtol, atol = TOLERANCES["float32"]
    with torch.no_grad():
        wants = []
        for seed in range(4):
            x, labels = job(seed=10 + seed, B=2)
            wants.append((x, {n: heads[n](x, labels=labels, return_logits=True).logits
                              for n in "ab"}))
    stop = threading.Event()
    seen, errors = {"a": 0, "b": 0}, []
    versions = {}

    def call(seed):
        x, want = wants[seed % 4]
        request = pb.ForwardRequest(model="r", hidden_states=pb.Tensor(
            dtype=pb.DATA_TYPE_FP32, shape=list(x.shape), data=x.numpy().tobytes()))
        with grpc.insecure_channel(server.address) as channel:
            forward = pb_grpc.LMHeadServiceStub(channel).Forward
            while not stop.is_set():
                try:
                    response = forward(request, timeout=30,
                                       metadata=[("authorization", f"Bearer {USER}")])
                except grpc.RpcError as error:
                    errors.append(error)
                    return
                name = versions.get(response.model_version)
                if name is None:
                    errors.append(AssertionError(f"version {response.model_version}"))
                    return
                logits = torch.from_numpy(_tensors.decode(response.logits).array.copy())
                if not torch.allclose(logits, want[name], rtol=rtol, atol=atol):
                    errors.append(AssertionError(f"an answer not from {name}'s head"))
                    return
                seen[name] += 1

    with RemoteLMHead(server.address, auth_token=ADMIN) as admin:
        for name in "ba":  # a version is its file's fingerprint: known before the callers start
            info = admin.load_model("r", f"heads/{name}.safetensors", replace=True)
            versions[info.version] = name
        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for i in range(12):
            time.sleep(0.05)
            name = "ba"[i % 2]
            admin.load_model("r", f"heads/{name}.safetensors", replace=True)
        stop.set()
        for thread in threads:
            thread.join()
        admin.unload_model("r")
    assert not errors, errors[:3]
    assert seen["a"] > 0 and seen["b"] > 0, seen


@pytest.mark.parametrize("name,path,code,starts", [
    ("c", "corrupt.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "model 'c' (corrupt"),
    ("c", "noconfig.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "model 'c' (noconfig"),
    ("c", "missing.safetensors", grpc.StatusCode.NOT_FOUND, "path: no file 'missing"),
    ("c", "heads", grpc.StatusCode.NOT_FOUND, "path: 'heads' is not a file"),
    ("c", "../x.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "path: '../x.safetensors' leads"),
    ("c", "escape.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "path: 'escape.safetensors' "
     "leads out"),
    ("c", "heads/../../x", grpc.StatusCode.INVALID_ARGUMENT, "path: 'heads/../../x' leads out"),
    ("c", "heads/../heads/a.json", grpc.StatusCode.INVALID_ARGUMENT, "model 'c' (heads/a.json)"),
    ("c", "/etc/passwd", grpc.StatusCode.INVALID_ARGUMENT, "path: expected a file's path relative"),
    ("c", "", grpc.StatusCode.INVALID_ARGUMENT, "path: "),
    ("c", "heads/a.safetensors\x00../../x", grpc.StatusCode.INVALID_ARGUMENT,
     "path: a file's path has no NUL character"),
    ("", "heads/a.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "name: "),
    ("a/b", "heads/a.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "name: "),
    ("x" * 129, "heads/a.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "name: "),
])
def test_a_failed_load_leaves_the_server_as_it_was(server, repository, name, path, code, starts):
    root, _ = repository
    x, labels = job()
    with RemoteLMHead(server.address, auth_token=ADMIN) as admin, \
            RemoteLMHead(server.address, auth_token=USER) as user:
        before = [(m.name, m.version) for m in user.list_models()]
        with pytest.raises(LMHeadError) as error:
            admin.load_model(name, path)
        assert error.value.code == code, error.value.details
        assert error.value.details.startswith(starts), error.value.details
        assert str(root) not in error.value.details  # the repository's place stays private
        assert [(m.name, m.version) for m in user.list_models()] == before
        assert user.forward(x, labels=labels).loss.isfinite()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_permission_denied(server, repository):
    root, _ = repository
    unreadable = root / "unreadable.safetensors"
    unreadable.write_bytes((root / "heads/a.safetensors").read_bytes())
    unreadable.chmod(0)
    with RemoteLMHead(server.address, auth_token=ADMIN) as admin:
        with pytest.raises(LMHeadError) as error:
            admin.load_model("u", "unreadable.safetensors")
    assert error.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "permission denied" in error.value.details


def test_only_administrators_change_models(server):
    x, labels = job()
    for token in (None, USER, "wrong-token-0123456789abcdef"):
        with RemoteLMHead(server.address, auth_token=token, max_attempts=1) as client:
            for call in (lambda: client.load_model("z", "heads/a.safetensors"),
                         lambda: client.unload_model("demo")):
                with pytest.raises(LMHeadError) as error:
                    call()
                assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert "--admin_token_file" in error.value.details
    # An administrator's token is not a caller's token.
    with RemoteLMHead(server.address, auth_token=ADMIN, max_attempts=1) as admin:
        with pytest.raises(LMHeadError) as error:
            admin.forward(x, labels=labels)
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
    with RemoteLMHead(server.address, auth_token=USER) as user:
        assert names(user) == ["demo"]


def test_administration_off_or_without_a_repository(tmp_path):
    off = start(tmp_path, admin=False, name="off")
    bare = start(tmp_path, repository=None, name="bare")
    try:
        with RemoteLMHead(off.address, auth_token=ADMIN) as client:
            with pytest.raises(LMHeadError) as error:
                client.load_model("z", "a.safetensors")
            assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "--admin_token_file" in error.value.details
        with RemoteLMHead(bare.address, auth_token=ADMIN) as admin:
            with pytest.raises(LMHeadError) as error:
                admin.load_model("z", "a.safetensors")
            assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert error.value.details.startswith("path: this server has no model repository")
            # Unloading needs no repository: here the default model goes, and calls that name no
            # model are told so.
            admin.unload_model("demo")
        with RemoteLMHead(bare.address, auth_token=USER) as user:
            assert user.list_models() == []
            with pytest.raises(LMHeadError) as error:
                x, labels = job()
                user.forward(x, labels=labels)
            assert error.value.code == grpc.StatusCode.NOT_FOUND
            assert "the default model 'demo' is not loaded" in error.value.details
            assert user.health() == "SERVING"
    finally:
        assert off.stop() == 0
        assert bare.stop() == 0
    assert "model 'demo' version demo-seed0 unloaded" in bare.log()


@pytest.mark.skipif(not CLI.exists(), reason="bazel build //client:lmhead")
def test_the_cli_loads_and_unloads(server, tmp_path):
    token = tmp_path / "admin"
    token.write_text(ADMIN + "\n")

    def cli(*args):
        return subprocess.run([str(CLI), *args, "--address", server.address, "--auth_token_file",
                               str(token)], capture_output=True, text=True, timeout=60)

    loaded = cli("load-model", "--name", "cli", "--path", "heads/b.safetensors")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith(f"loaded cli: d_model {D}, vocab_size {V}, FP32")
    with RemoteLMHead(server.address, auth_token=USER) as user:
        assert "cli" in names(user)
    again = cli("load-model", "--name", "cli", "--path", "heads/b.safetensors")
    assert again.returncode != 0 and "ALREADY_EXISTS" in again.stderr
    assert cli("unload-model", "--name", "cli").returncode == 0
    with RemoteLMHead(server.address, auth_token=USER) as user:
        assert "cli" not in names(user)
