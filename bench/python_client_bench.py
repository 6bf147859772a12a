"""Request encoding in the Python client, measured against the real server on loopback.

Sends the same Forward (hidden states of --mib MiB, fp32) encoded two ways in one run:
  protobuf  a ForwardRequest message built with the tensor bytes (the baseline: copies twice)
  wire      lmhead_client's WireRequest (tensor bytes appended to the serialised message)
and prints the median wall time of each, the server's own time (from ForwardResponse.timings)
and the ratio. Run after `bazel build //server:lmhead_server` and generating the stubs:

    PYTHONPATH=client/python $(tools/venv.sh path)/bin/python bench/python_client_bench.py
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from lmhead_client import _tensors
from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="hidden states per call (MiB)")
    parser.add_argument("--calls", type=int, default=6, help="timed calls per encoding")
    parser.add_argument("--server", default=str(REPO / "bazel-bin/server/lmhead_server"))
    args = parser.parse_args()

    d_model = 4096
    rows = args.mib * (1 << 20) // (4 * d_model)
    x = np.random.default_rng(0).standard_normal((1, rows, d_model), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        # A vocabulary of 8 keeps the server's work small next to moving the bytes.
        server = subprocess.Popen(
            [args.server, "--host=127.0.0.1", "--port=0", f"--port_file={port_file}",
             f"--demo_d_model={d_model}", "--demo_vocab_size=8"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not port_file.exists() or not port_file.read_text().strip():
                time.sleep(0.05)
            channel = grpc.insecure_channel(
                f"127.0.0.1:{port_file.read_text().strip()}",
                options=[("grpc.max_send_message_length", -1),
                         ("grpc.max_receive_message_length", -1)])
            method = "/lmhead.v1.LMHeadService/Forward"
            as_message = channel.unary_unary(
                method, request_serializer=pb.ForwardRequest.SerializeToString,
                response_deserializer=pb.ForwardResponse.FromString)
            as_wire = channel.unary_unary(
                method, request_serializer=_tensors.WireRequest.serialize,
                response_deserializer=pb.ForwardResponse.FromString)

            def protobuf_call():
                request = pb.ForwardRequest(hidden_states=_tensors.encode(x))
                request.options.logits_to_keep_count = 1
                return as_message(request, timeout=120)

            def wire_call():
                request = pb.ForwardRequest()
                request.options.logits_to_keep_count = 1
                wire = _tensors.WireRequest(request)
                wire.add(_tensors.WireRequest.HIDDEN_STATES, x)
                return as_wire(wire, timeout=120)

            results = {}
            for _ in range(args.calls + 1):  # alternate, first round is warm-up
                for name, call in (("protobuf", protobuf_call), ("wire", wire_call)):
                    start = time.perf_counter()
                    response = call()
                    wall = time.perf_counter() - start
                    results.setdefault(name, []).append(
                        (wall * 1e3, response.timings.total_us / 1e3))
        finally:
            server.terminate()
            server.wait()

    print(f"Forward of {x.nbytes / (1 << 20):.0f} MiB fp32 hidden states, loopback, "
          f"median of {args.calls}:")
    print(f"{'encoding':10} {'wall ms':>9} {'server ms':>10} {'outside ms':>11}")
    medians = {}
    for name, samples in results.items():
        wall = statistics.median(s[0] for s in samples[1:])
        server_ms = statistics.median(s[1] for s in samples[1:])
        medians[name] = wall
        print(f"{name:10} {wall:9.1f} {server_ms:10.1f} {wall - server_ms:11.1f}")
    print(f"wire/protobuf wall-time ratio: {medians['wire'] / medians['protobuf']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
