"""Same-host shared memory from Python (docs/API.md "Shared memory"): the guide's snippet against
the real server, and a client killed mid-session, whose regions the server must drop when its
connection goes (tests/e2e/shared_memory_test.cc covers the rest)."""

import queue
import secrets
import subprocess
import sys
import textwrap
import time
from multiprocessing import shared_memory

import grpc
import numpy as np
import pytest

from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb
from lmhead_client._proto.lmhead.v1 import lmhead_pb2_grpc as pb_grpc
from server_process import CLIENT


@pytest.fixture
def server(start_server):
    return start_server(["--allow_shared_memory"])


def _name() -> str:
    """An object name the server registers (its --shared_memory_key_prefix is "/lmhead")."""
    return f"lmhead-test-{secrets.token_hex(8)}"


def test_the_guides_snippet_gives_what_an_inline_call_gives(server):
    # docs/API.md "Shared memory", as written there (but for the address).
    x = np.random.default_rng(0).standard_normal((4, 128, 64), dtype=np.float32)
    logits_bytes = 4 * 128 * 1000 * 4                      # (4, 128, vocab 1000) fp32
    shm = shared_memory.SharedMemory(name=_name(), create=True, size=x.nbytes + logits_bytes)
    np.ndarray(x.shape, x.dtype, buffer=shm.buf)[:] = x

    channel = grpc.insecure_channel(server.address)         # the session's and the calls' channel
    stub = pb_grpc.LMHeadServiceStub(channel)
    requests = queue.Queue()
    session = stub.SharedMemory(iter(requests.get, None))  # open until None is put
    requests.put(pb.SharedMemoryRequest(register_system=pb.RegisterSystemSharedMemory(
        key="/" + shm.name, byte_size=shm.size)))
    answer = next(session)
    assert answer.code == 0, answer.message
    region = answer.region

    out = stub.Forward(pb.ForwardRequest(
        hidden_states=pb.Tensor(
            dtype=pb.DATA_TYPE_FP32, shape=x.shape,
            shared_memory=pb.SharedMemoryRef(region=region, byte_size=x.nbytes)),
        outputs=pb.OutputRegions(logits=pb.SharedMemoryRef(
            region=region, offset=x.nbytes, byte_size=logits_bytes))))
    logits = np.ndarray(tuple(out.logits.shape), np.float32, buffer=shm.buf, offset=x.nbytes)

    # The same call inline: the same bits.
    inline = stub.Forward(pb.ForwardRequest(
        hidden_states=pb.Tensor(dtype=pb.DATA_TYPE_FP32, shape=x.shape, data=x.tobytes())))
    assert out.logits.data == b"" and out.logits.shared_memory.region == region
    assert logits.tobytes() == inline.logits.data

    requests.put(None)               # ends the session: the server unregisters the region
    list(session)
    with pytest.raises(grpc.RpcError) as error:
        stub.Forward(pb.ForwardRequest(hidden_states=pb.Tensor(
            dtype=pb.DATA_TYPE_FP32, shape=x.shape,
            shared_memory=pb.SharedMemoryRef(region=region, byte_size=x.nbytes))))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details().startswith("hidden_states.shared_memory.region: no region")
    del logits
    channel.close()
    shm.close()
    shm.unlink()


_CHILD = textwrap.dedent("""
    import queue, sys, time
    import grpc
    sys.path.insert(0, sys.argv[3])
    from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb, lmhead_pb2_grpc as pb_grpc
    stub = pb_grpc.LMHeadServiceStub(grpc.insecure_channel(sys.argv[1]))
    requests = queue.Queue()
    session = stub.SharedMemory(iter(requests.get, None))
    requests.put(pb.SharedMemoryRequest(register_system=pb.RegisterSystemSharedMemory(
        key=sys.argv[2], byte_size=4096)))
    print(next(session).code, flush=True)
    time.sleep(600)
""")


def _register(stub, key):
    requests = queue.Queue()
    session = stub.SharedMemory(iter(requests.get, None))
    requests.put(pb.SharedMemoryRequest(register_system=pb.RegisterSystemSharedMemory(
        key=key, byte_size=4096)))
    answer = next(session)
    requests.put(None)
    list(session)
    return answer


def test_a_killed_clients_regions_go_with_its_connection(server):
    shm = shared_memory.SharedMemory(name=_name(), create=True, size=4096)
    key = "/" + shm.name
    child = subprocess.Popen([sys.executable, "-c", _CHILD, server.address, key, str(CLIENT)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "0"
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.LMHeadServiceStub(channel)
            answer = _register(stub, key)
            assert answer.code == grpc.StatusCode.PERMISSION_DENIED.value[0], answer.message
            child.kill()  # no half-close, no cancellation: the connection just goes
            child.wait()
            deadline = time.monotonic() + 20
            while (answer := _register(stub, key)).code != 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert answer.code == 0, answer.message
    finally:
        child.kill()
        child.wait()
        shm.close()
        shm.unlink()
