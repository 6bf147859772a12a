"""Bearer tokens (--auth_token_file) with the Python client: every LMHeadService call needs one
of the server's tokens, given as RemoteLMHead(auth_token=...) or LMHEAD_AUTH_TOKEN; the health
service needs none; unary calls, parallel streams and shared memory sessions carry it."""

import grpc
import pytest
import torch

from lmhead_client import LMHeadError, RemoteLMHead
from server_process import ServerProcess

TOKEN = "python-token-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("auth")
    tokens = workdir / "tokens"
    tokens.write_text(f"other-token-0123456789abcdef\n{TOKEN}\n")
    process = ServerProcess(["--auth_token_file", str(tokens), "--allow_shared_memory"],
                            workdir / "server")
    yield process
    process.stop()


def job():
    torch.manual_seed(0)
    return torch.randn(6, 5, 64), torch.randint(1000, (6, 5))


@pytest.mark.parametrize("token", [None, "", "wrong-token-0123456789abcdef", TOKEN[:-1]])
def test_calls_without_the_token_are_unauthenticated(server, monkeypatch, token):
    monkeypatch.delenv("LMHEAD_AUTH_TOKEN", raising=False)
    x, labels = job()
    with RemoteLMHead(server.address, auth_token=token, max_attempts=1,
                      shared_memory="off") as head:
        for call in (head.list_models, lambda: head.forward(x, labels=labels),
                     lambda: head.forward_stream(x, labels=labels, micro_batch_size=2)):
            with pytest.raises(LMHeadError) as error:
                call()
            assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "token-0123" not in error.value.details
        assert head.health() == "SERVING"  # probes carry no token


def test_the_token_as_an_argument_or_from_the_environment(server, monkeypatch):
    x, labels = job()
    monkeypatch.delenv("LMHEAD_AUTH_TOKEN", raising=False)
    with RemoteLMHead(server.address, auth_token=TOKEN, shared_memory="off") as head:
        one = head.forward(x, labels=labels, loss_reduction="none")
        streamed = head.forward_stream(x, labels=labels, loss_reduction="none",
                                       micro_batch_size=2, parallel_streams=3)
        # Other batch sizes, other GEMM blockings: equal to fp32 rounding.
        torch.testing.assert_close(streamed.loss, one.loss, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("LMHEAD_AUTH_TOKEN", TOKEN)
    with RemoteLMHead(server.address, shared_memory="on") as head:
        # Shared memory: its session and the forwards that name its regions carry the token.
        x_big = torch.randn(4, 1024, 64)
        labels_big = torch.randint(1000, (4, 1024))
        via_shm = head.forward(x_big, labels=labels_big, loss_reduction="none")
        assert head.shared_memory_active
    with RemoteLMHead(server.address, auth_token=TOKEN, shared_memory="off") as head:
        inline = head.forward(x_big, labels=labels_big, loss_reduction="none")
    assert torch.equal(via_shm.loss, inline.loss)


def test_reflection_is_off_with_tokens(server):
    """Its handlers could not check a token: a token server does not offer reflection."""
    with grpc.insecure_channel(server.address) as channel:
        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as error:
            list(reflect(iter([b"\x3a\x00"]), timeout=10))  # list_services = ""
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_token_read_from_a_file_keeps_working(server, monkeypatch):
    monkeypatch.delenv("LMHEAD_AUTH_TOKEN", raising=False)
    with RemoteLMHead(server.address, auth_token=TOKEN + "\n", shared_memory="off") as head:
        assert head.list_models()
