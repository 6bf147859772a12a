"""Scale-out across replicas (docs/OPERATIONS.md "Scaling out"): one client given three real
servers spreads its calls over them with gRPC's round_robin policy, and when one of them is
killed with calls in flight on it, every call is still answered, correctly, by the others (gRPC's
retry policy), none lost. The same for the lmhead CLI given the three addresses.

The three servers serve the same seeded demo head, so every answer is checked against the
answer of one server alone to the same input. A replica is made to hold calls in flight for
certain by stopping it (SIGSTOP: its connections stay open, nothing is answered) before it is
killed (SIGKILL), so the calls it held fail with UNAVAILABLE when it dies.
"""

import os
import re
import shutil
import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest

from lmhead_client import LMHeadError, RemoteLMHead
from lmhead_client.client import channel_target
from server_process import REPO, ServerProcess
from test_tls import make_certificates

D, V = 64, 1000  # the demo head's
CLI = REPO / "bazel-bin/client/lmhead"
INPUTS = 8  # distinct inputs, used in turn by the calls


def forward_count(server: ServerProcess) -> int:
    """The server's Forward calls answered OK for the demo model, from its /metrics."""
    return int(server.metrics().get(
        'lmhead_request_total{code="OK",method="Forward",model="demo"}', 0))


def answered_in_log(server: ServerProcess) -> int:
    """Forward calls the server logged as answered (one line each, flushed as written)."""
    return len(re.findall(r" Forward model='[^']*' .* ok$", server.log(), re.M))


@pytest.fixture
def replicas(start_server):
    return [start_server(["--metrics_port", "0"]) for _ in range(3)]


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((2, 8, D), dtype=np.float32),
             rng.integers(0, V, (2, 8)).astype(np.int64)) for _ in range(INPUTS)]


def reference(address: str, inputs) -> list:
    """Each input's (logits, loss) from one server alone."""
    with RemoteLMHead(address, shared_memory="off", max_attempts=1) as head:
        return [tuple(head.forward(x, labels=labels)[:2]) for x, labels in inputs]


def check(answer, expected) -> None:
    np.testing.assert_allclose(answer.logits, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(answer.loss, expected[1], rtol=1e-5, atol=1e-6)


def test_addresses_make_one_round_robin_target():
    assert channel_target("127.0.0.1:1") == ("127.0.0.1:1", False)
    assert channel_target("localhost:1") == ("localhost:1", False)
    assert channel_target(["127.0.0.1:1", "10.0.0.2:2"]) == ("ipv4:127.0.0.1:1,10.0.0.2:2", True)
    assert channel_target("127.0.0.1:1, 127.0.0.1:2") == ("ipv4:127.0.0.1:1,127.0.0.1:2", True)
    assert channel_target("[::1]:1,[::1]:2") == ("ipv6:[::1]:1,[::1]:2", True)
    assert channel_target("dns:///lmhead.ns.svc:50051") == ("dns:///lmhead.ns.svc:50051", True)
    for bad, says in (("localhost:1,localhost:2", "'localhost:1' in a list"),
                      ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"),
                      ("127.0.0.1:1,127.0.0.1", "'127.0.0.1' in a list"),
                      ("127.0.0.1:1,", "expected HOST:PORT")):
        with pytest.raises(ValueError, match=re.escape(says)):
            channel_target(bad)
    with pytest.raises(ValueError, match="shared_memory='on' needs one server"):
        RemoteLMHead("127.0.0.1:1,127.0.0.1:2", shared_memory="on")


def test_calls_spread_over_replicas_and_survive_one_killed(replicas, inputs):
    expected = reference(replicas[0].address, inputs)
    before = [forward_count(server) for server in replicas]

    with RemoteLMHead([server.address for server in replicas], timeout=60,
                      shared_memory="auto") as head:
        assert not head.shared_memory_active
        # Spread: sequential calls go to the replicas in turn.
        calls = 60
        for i in range(calls):
            x, labels = inputs[i % INPUTS]
            check(head.forward(x, labels=labels), expected[i % INPUTS])
        spread = [forward_count(server) - b for server, b in zip(replicas, before)]
        assert sum(spread) == calls, spread
        assert min(spread) >= calls // 3 - 5, spread

        # Failover: workers call without pause; replica 1 is stopped, so that every worker
        # ends up waiting on a call it holds, then killed.
        workers, total = 6, 240
        answers = [None] * total
        errors = []
        indices = iter(range(total))
        lock = threading.Lock()
        started, finished = [0], [0]

        def work():
            while True:
                with lock:
                    i = next(indices, None)
                    if i is None:
                        return
                    started[0] += 1
                x, labels = inputs[i % INPUTS]
                try:
                    answers[i] = head.forward(x, labels=labels)
                except Exception as e:  # noqa: BLE001 - reported by the test
                    errors.append((i, e))
                with lock:
                    finished[0] += 1

        counts = [forward_count(server) for server in replicas]
        logged_1 = answered_in_log(replicas[1])
        threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
        for thread in threads:
            thread.start()
        while finished[0] < 30:
            time.sleep(0.01)
        os.kill(replicas[1].process.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while True:  # until nothing finishes for a while
            seen = finished[0]
            time.sleep(0.5)
            if finished[0] == seen:
                break
            assert time.monotonic() < deadline, "calls kept finishing with a replica stopped"
        with lock:
            held = started[0] - finished[0]
        assert held == workers, (started[0], finished[0])
        answered_by_1 = answered_in_log(replicas[1]) - logged_1
        replicas[1].process.kill()  # SIGKILL: its connections close with the calls on them
        replicas[1].process.wait()
        for thread in threads:
            thread.join(120)
        assert not errors, errors[:3]
        assert started[0] == finished[0] == total

    # Every call answered, correctly, the held ones by the other replicas. (A call replica 1
    # had logged as answered when it stopped, but not yet sent, is answered by another too:
    # hence the range.)
    assert all(answer is not None for answer in answers)
    for i, answer in enumerate(answers):
        check(answer, expected[i % INPUTS])
    by_others = sum(forward_count(replicas[s]) - counts[s] for s in (0, 2))
    assert total <= by_others + answered_by_1 <= total + held, (by_others, answered_by_1)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_tls_replicas_check_one_name(start_server, tmp_path, inputs):
    """With TLS the replicas' certificates are checked against one name: by default the list's
    first address (here 127.0.0.1, which the certificate holds), else tls_server_name."""
    make_certificates(tmp_path / "tls", ["server"])
    tls = ["--tls_cert", str(tmp_path / "tls/server.pem"),
           "--tls_key", str(tmp_path / "tls/server.key")]
    servers = [start_server(tls + ["--metrics_port", "0"]) for _ in range(2)]
    addresses = [server.address for server in servers]
    roots = str(tmp_path / "tls/ca.pem")
    x, labels = inputs[0]
    for name in (None, "localhost"):
        with RemoteLMHead(addresses, tls_roots=roots, tls_server_name=name, max_attempts=1,
                          timeout=30) as head:
            for _ in range(6):
                head.forward(x, labels=labels)
    assert sum(forward_count(server) for server in servers) == 12
    # A name the certificate does not hold fails the handshake.
    with RemoteLMHead(addresses, tls_roots=roots, tls_server_name="elsewhere.example",
                      max_attempts=1, timeout=10) as head:
        with pytest.raises(LMHeadError) as error:
            head.forward(x, labels=labels)
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
    if CLI.exists():  # the CLI (bazel-bin/client/lmhead) does the same
        cli = subprocess.run([str(CLI), "models", "--address", ",".join(addresses),
                              "--tls_roots", roots], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr


def micro_batches_answered(server: ServerProcess) -> int:
    """Micro-batches the server logged as answered (--log_level=debug: one line each)."""
    return len(re.findall(r" micro-batch \d+ total_us=", server.log()))


def test_stream_goes_on_when_its_replica_is_killed(start_server):
    """forward_stream over three replicas: the replica answering one of its streams is killed
    two answers in, and the stream carries on on another replica from its first unanswered
    micro-batch; the job gives what one server gives."""
    # Each micro-batch waits up to 20 ms for company in its server's queue: the streams last.
    servers = [start_server(["--log_level=debug", "--max_queue_delay_us=20000"])
               for _ in range(3)]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((48, 4, D), dtype=np.float32)
    labels = rng.integers(0, V, (48, 4)).astype(np.int64)
    with RemoteLMHead(servers[0].address, shared_memory="off") as alone:
        want = alone.forward(x, labels=labels)
    before = [micro_batches_answered(server) for server in servers]
    result = {}

    def job():
        with RemoteLMHead([server.address for server in servers], timeout=120) as head:
            try:
                result["out"] = head.forward_stream(x, labels=labels, micro_batch_size=1,
                                                    parallel_streams=3)
            except Exception as e:  # noqa: BLE001 - reported by the test
                result["error"] = e

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        for s, server in enumerate(servers):
            if micro_batches_answered(server) - before[s] >= 2:
                victim = s
                break
        time.sleep(0.002)
    assert victim is not None, "no replica answered the job"
    servers[victim].process.kill()
    servers[victim].process.wait()
    thread.join(120)
    assert "error" not in result, result.get("error")
    check(result["out"], (want.logits, want.loss))
    # The victim answered some of a stream's 16 micro-batches, not all; the others the rest.
    by_victim = micro_batches_answered(servers[victim]) - before[victim]
    assert 2 <= by_victim
    assert sum(micro_batches_answered(servers[s]) - before[s] for s in range(3)) >= 48
    assert len(re.findall(r" ForwardStream \d+ micro-batch", servers[victim].log())) == 0, \
        servers[victim].log()[-2000:]


def test_connections_are_recycled_without_failing_calls(start_server):
    """--max_connection_age_seconds: the server asks a connection to close after its age (how
    clients of a DNS name find replicas added later: they resolve it again to reconnect). The
    client reconnects by itself; unary calls go on without an error and a stream open across
    the age runs to its end on the old connection."""
    server = start_server(["--max_connection_age_seconds", "1"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, D)).astype(np.float32)
    labels = rng.integers(0, V, (4, 3))
    with RemoteLMHead(server.address, shared_memory="off", max_attempts=1) as head:
        states = []
        head._channel.subscribe(states.append, try_to_connect=True)
        want = head.forward(x, labels=labels, loss_reduction="none").loss
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            np.testing.assert_allclose(head.forward(x, labels=labels, loss_reduction="none").loss,
                                       want, rtol=1e-6)
            time.sleep(0.05)
        stream = head.iter_forward_stream(x, labels=labels, loss_reduction="none",
                                          micro_batch_size=1)
        micro_batches = []
        for micro_batch in stream:
            micro_batches.append(micro_batch)
            time.sleep(0.6)  # the stream lives past the connection's age
        assert [c.start for c in micro_batches] == [0, 1, 2, 3]
        for c in micro_batches:
            np.testing.assert_allclose(c.output.loss, want[c.start:c.stop], rtol=1e-6)
    ready = states.count(grpc.ChannelConnectivity.READY)
    assert ready >= 3, states  # connected, then reconnected after each age


@pytest.mark.skipif(not CLI.exists(), reason="bazel build //client:lmhead")
def test_one_call_clients_spread_over_replicas(replicas):
    """Many short-lived clients of one call each (a CLI run) reach every replica: each process
    starts round_robin at a random address of the list, not always at the first."""
    addresses = ",".join(server.address for server in replicas)
    for _ in range(30):
        run = subprocess.run([str(CLI), "models", "--address", addresses], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
    counts = [int(server.metrics().get(
        'lmhead_request_total{code="OK",method="ListModels",model=""}', 0))
        for server in replicas]
    assert sum(counts) == 30 and min(counts) > 0, counts
