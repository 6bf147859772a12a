"""Where a big unary call's time goes (issue 13, item 1): the Python client's serialisation, the
call through gRPC (HTTP/2 over loopback, the server's protobuf parse, the response), and the
server's own phases from the response's ServerTimings (decode: wire bytes to tensors; queue;
compute: the executor's batch, H2D and D2H copies included; encode), beside the raw loopback
TCP rate of the same host as the ceiling a transport could reach.

Each phase is the median of --repeat calls after one warm-up; "gRPC transport" is the call's
wall time less the server's total, so it holds both directions' HTTP/2 framing and flow
control, the server's protobuf parse of the request and the client's of the response.

    PYTHONPATH=client/python python bench/transport_breakdown.py \\
        --lmhead bazel-bin/server/lmhead_server --tokens 8192 --d_model 4096 --vocab_size 1024

With --device cuda:0 the server's head runs on that GPU (bf16 on the wire).
"""

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

from lmhead_client import _tensors
from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_bench import Process, timed  # noqa: E402  (a server on a free port; a median)


def loopback_tcp_seconds(size: int, repeat: int) -> float:
    """Seconds to move `size` bytes through a loopback TCP connection (sendall / recv_into)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        payload = memoryview(bytearray(size))

        def sink():
            connection, _ = listener.accept()
            buffer = bytearray(1 << 20)
            with connection:
                for _ in range(repeat + 1):
                    left = size
                    while left:
                        left -= connection.recv_into(buffer, min(left, len(buffer)))
                    connection.sendall(b"k")

        receiver = threading.Thread(target=sink)
        receiver.start()
        with socket.create_connection(("127.0.0.1", port)) as sender:
            def send():
                sender.sendall(payload)
                sender.recv(1)
            result = timed(send, repeat)
        receiver.join()
        return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="a running server (else --lmhead starts one)")
    parser.add_argument("--lmhead", default="bazel-bin/server/lmhead_server",
                        help="the server binary, started with the demo head")
    parser.add_argument("--device", default="cpu", help="the server's --device")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per call")
    parser.add_argument("--d_model", type=int, default=4096)
    parser.add_argument("--vocab_size", type=int, default=1024,
                        help="the demo head's vocabulary (small on a CPU: compute is not the "
                             "point here)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="the hidden states' dtype on the wire")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per phase")
    parser.add_argument("--server_flags", default="", help="more flags for the started server")
    args = parser.parse_args(argv)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    x = torch.randn(1, args.tokens, args.d_model).to(dtype)
    labels = torch.randint(args.vocab_size, (1, args.tokens))
    small = pb.ForwardRequest(
        options=pb.ForwardOptions(loss_reduction=pb.LOSS_REDUCTION_SUM, return_logits=False),
        config=pb.HeadConfig(loss_implementation=pb.LOSS_IMPLEMENTATION_FUSED_LINEAR))

    def serialise(hidden=x, ids=labels) -> bytes:
        wire = _tensors.WireRequest(small)
        wire.add(_tensors.WireRequest.HIDDEN_STATES, hidden)
        wire.add(_tensors.WireRequest.LABELS, ids)
        return wire.serialize()

    request = serialise()
    tiny = serialise(x[:, :1], labels[:, :1])
    workdir = Path(tempfile.mkdtemp(prefix="lmhead-breakdown-"))
    server = None
    address = args.address
    if address is None:
        demo_dtype = "bfloat16" if args.device != "cpu" else "float32"
        server = Process([args.lmhead, "--host", "127.0.0.1", "--device", args.device,
                          "--demo_d_model", str(args.d_model), "--demo_vocab_size",
                          str(args.vocab_size), "--demo_dtype", demo_dtype, "--log_level",
                          "warn"] + args.server_flags.split(), workdir, "lmhead",
                         # The server's huge pages follow its own flag, not this process's.
                         env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
        address = server.address
    try:
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        with grpc.insecure_channel(address, options=options) as channel:
            forward = channel.unary_unary("/lmhead.v1.LMHeadService/Forward",
                                          request_serializer=lambda b: b,
                                          response_deserializer=pb.ForwardResponse.FromString)
            responses = []

            def call(body):
                responses.append(forward(body, timeout=600))

            encode_s = timed(serialise, args.repeat)
            call_s = timed(lambda: call(request), args.repeat)
            answered = responses[-args.repeat:]
            tiny_s = timed(lambda: call(tiny), args.repeat)
        server_ms = {field: statistics.median(getattr(r.timings, f"{field}_us") for r in answered)
                     / 1e3 for field in ("decode", "queue", "compute", "encode", "total")}
    finally:
        if server is not None:
            server.stop()
    tcp_s = loopback_tcp_seconds(len(request), args.repeat)

    size = len(request)
    transport_ms = call_s * 1e3 - server_ms["total"]
    print(f"one unary Forward of {args.tokens} tokens, d_model {args.d_model}, {args.dtype} "
          f"({size / 2**20:.1f} MiB request), server --device {args.device}, median of "
          f"{args.repeat}")
    rows = [
        ("client: serialise (Python, WireRequest)", encode_s * 1e3),
        ("gRPC transport (both ways, parse included)", transport_ms),
        ("server: decode (wire bytes to tensors)", server_ms["decode"]),
        ("server: queue", server_ms["queue"]),
        ("server: compute (batch, copies to and from the device)", server_ms["compute"]),
        ("server: encode", server_ms["encode"]),
        ("call, wall (serialised request to parsed response)", call_s * 1e3),
        ("a 1-token call, wall (the fixed cost of a call)", tiny_s * 1e3),
        ("raw loopback TCP, the same bytes (the ceiling)", tcp_s * 1e3),
    ]
    for name, ms in rows:
        rate = f"{size / (ms / 1e3) / 1e9:6.2f} GB/s" if ms > 0.05 else ""
        print(f"  {name:<56} {ms:9.2f} ms  {rate}")
    print(f"end to end (serialise + call): {(encode_s + call_s) * 1e3:.2f} ms, "
          f"{args.tokens / (encode_s + call_s):,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
