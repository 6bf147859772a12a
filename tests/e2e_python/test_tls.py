"""TLS and mutual TLS with the Python client (docs/API.md "TLS"): the real server with
--tls_cert/--tls_key/--tls_client_ca, certificates made by the openssl command for the run."""

import shutil
import signal
import subprocess
import threading
import time

import grpc
import pytest
import torch

from lmhead_client import LMHeadError, RemoteLMHead
from server_process import ServerProcess

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


def make_certificates(directory, leaves):
    """directory/ca.pem and, per leaf, LEAF.pem and LEAF.key for 127.0.0.1 and localhost."""
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    directory.mkdir(parents=True, exist_ok=True)
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)
    run("req", "-x509", *key, "-keyout", directory / "ca.key", "-out", directory / "ca.pem",
        "-days", "1", "-subj", "/CN=test-ca")
    (directory / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for leaf in leaves:
        run("req", *key, "-keyout", directory / f"{leaf}.key", "-out", directory / f"{leaf}.csr",
            "-subj", f"/CN={leaf}")
        run("x509", "-req", "-in", directory / f"{leaf}.csr", "-CA", directory / "ca.pem",
            "-CAkey", directory / "ca.key", "-CAcreateserial", "-out", directory / f"{leaf}.pem",
            "-days", "1", "-extfile", directory / "ext")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    make_certificates(directory, ["server", "client"])
    return directory


@pytest.fixture(scope="module")
def server(certificates, tmp_path_factory):
    process = ServerProcess(["--tls_cert", str(certificates / "server.pem"),
                             "--tls_key", str(certificates / "server.key"),
                             "--tls_client_ca", str(certificates / "ca.pem")],
                            tmp_path_factory.mktemp("tls-server"))
    yield process
    process.stop()


def test_mutual_tls_with_paths_bytes_or_the_environment(server, certificates, monkeypatch):
    for name in ("LMHEAD_TLS_ROOTS", "LMHEAD_TLS_CERT", "LMHEAD_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    torch.manual_seed(0)
    x, labels = torch.randn(2, 5, 64), torch.randint(1000, (2, 5))
    with RemoteLMHead(server.address, tls_roots=str(certificates / "ca.pem"),
                      tls_cert=(certificates / "client.pem").read_text(),  # PEM text
                      tls_key=(certificates / "client.key").read_bytes()) as head:
        want = head.forward(x, labels=labels, loss_reduction="none")
        streamed = head.forward_stream(x, labels=labels, loss_reduction="none",
                                       micro_batch_size=1, parallel_streams=2)
        torch.testing.assert_close(streamed.loss, want.loss, rtol=1e-5, atol=1e-5)
        assert head.health() == "SERVING"
    monkeypatch.setenv("LMHEAD_TLS_ROOTS", str(certificates / "ca.pem"))
    monkeypatch.setenv("LMHEAD_TLS_CERT", str(certificates / "client.pem"))
    monkeypatch.setenv("LMHEAD_TLS_KEY", str(certificates / "client.key"))
    with RemoteLMHead(server.address) as head:
        assert torch.equal(head.forward(x, labels=labels, loss_reduction="none").loss, want.loss)


def test_clients_without_the_ca_or_a_certificate_do_not_connect(server, certificates,
                                                                monkeypatch):
    for name in ("LMHEAD_TLS_ROOTS", "LMHEAD_TLS_CERT", "LMHEAD_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    for arguments in ({}, {"tls": True}, {"tls_roots": str(certificates / "ca.pem")}):
        with RemoteLMHead(server.address, max_attempts=1, timeout=10, **arguments) as head:
            with pytest.raises(LMHeadError) as error:
                head.list_models()
            assert error.value.code == grpc.StatusCode.UNAVAILABLE, arguments
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        RemoteLMHead(server.address, tls_cert=str(certificates / "client.pem"))
    with pytest.raises(ValueError, match="tls_roots: .* is not a PEM file"):
        RemoteLMHead(server.address, tls_roots=str(certificates / "ext"))


def test_a_plaintext_health_port_for_probes(certificates, tmp_path):
    """--health_port: probes that cannot speak TLS (the kubelet's) get the health service, and
    nothing else, in plaintext."""
    import re

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb
    from lmhead_client._proto.lmhead.v1 import lmhead_pb2_grpc as pb_grpc

    server = ServerProcess(["--tls_cert", str(certificates / "server.pem"),
                            "--tls_key", str(certificates / "server.key"), "--health_port", "0",
                            "--shutdown_grace_seconds", "20"], tmp_path)
    try:
        port = re.search(r"health checks \(plaintext\) on [^:]+:(\d+)", server.log()).group(1)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "lmhead.v1.LMHeadService"):
                answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
            with pytest.raises(grpc.RpcError) as error:
                pb_grpc.LMHeadServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # It follows the main port: NOT_SERVING while the server drains on SIGTERM (a stream
            # held open on the TLS port keeps it draining).
            credentials = grpc.ssl_channel_credentials((certificates / "ca.pem").read_bytes())
            with grpc.secure_channel(server.address, credentials) as tls:
                release = threading.Event()

                def requests():
                    release.wait(30)
                    return
                    yield  # a generator that sends nothing until released

                stream = tls.stream_stream("/lmhead.v1.LMHeadService/ForwardStream",
                                           request_serializer=lambda b: b,
                                           response_deserializer=lambda b: b)(requests())
                time.sleep(0.5)  # the stream is open on the server
                server.process.send_signal(signal.SIGTERM)
                status = None
                for _ in range(50):
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                    if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                    time.sleep(0.1)
                release.set()
                list(stream)
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        assert server.stop() == 0
