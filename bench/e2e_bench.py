"""End-to-end tokens/s of one big job through the transport (issue 13's benchmark): the Python
client and the `lmhead` CLI against lmhead_server, with 1 and K parallel streams, the Python
client through system shared memory and (with --device cuda:N, the job's hidden states created
on that GPU) through CUDA IPC, and the same Python client against bench/reference_server.py (the
server a user would write instead), on the same weights; each figure beside the kernel-only
tokens/s given with --kernel_tokens_per_s (on a GPU machine `gpu_lm_head_bench --serving`
measures it in the same run: tools/gpu/bench.sh e2e). lmhead_server runs with
--allow_shared_memory; the other rows' clients have shared memory off.

The job: --rows x (--tokens / --rows) hidden states (bf16 on a GPU, fp32 on the CPU) with int64
labels, loss reduction sum, no logits. The head: rms norm, no bias, random weights in
--d_model x --vocab_size, written once as OLMo-core's state dict plus lmhead's head JSON; both
servers load that file. Each figure is the median of --repeat timed jobs after one warm-up.

    PYTHONPATH=client/python python bench/e2e_bench.py --device cuda:0 \\
        --kernel_tokens_per_s 609395 --lmhead bazel-bin/server/lmhead_server \\
        --cli bazel-bin/client/lmhead
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmhead_client import RemoteLMHead
from results_table import append_result

REPO = Path(__file__).resolve().parents[1]


class Process:
    """A server started on a free port (--port 0 --port_file), stopped with SIGTERM."""

    def __init__(self, argv, workdir: Path, name: str, env=None):
        self.port_file = workdir / f"{name}.port"
        self.log = open(workdir / f"{name}.log", "wb")
        self.process = subprocess.Popen(argv + ["--port", "0", "--port_file", str(self.port_file)],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while not self.port_file.exists() or not self.port_file.read_text().strip():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: "
                                   f"{(workdir / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.1)
        self.address = f"127.0.0.1:{int(self.port_file.read_text())}"

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def run_cli(command):
    """Runs the CLI; a failure raises with its own message (stderr), not only its status."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")


def timed(run, repeat: int) -> float:
    """The median seconds of `repeat` runs of `run`, after one run not counted."""
    run()  # warm-up
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


class _OldName(argparse.Action):
    """An option's old name, kept for one release: stores into the new one, with a deprecation
    message on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"e2e_bench.py: {option_string} is deprecated, use --{self.dest}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lmhead", default=str(REPO / "bazel-bin/server/lmhead_server"))
    parser.add_argument("--cli", default=str(REPO / "bazel-bin/client/lmhead"),
                        help="the lmhead CLI ('' skips its rows)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d_model", type=int, default=4096)
    parser.add_argument("--vocab_size", type=int, default=128256)
    parser.add_argument("--tokens", type=int, default=32768, help="tokens in the job")
    parser.add_argument("--rows", type=int, default=16, help="rows (batch) of the job")
    parser.add_argument("--micro_batch_mib", type=float, default=64, help="micro-batch size, MiB")
    parser.add_argument("--chunk_mib", type=float, dest="micro_batch_mib", action=_OldName,
                        help="deprecated: use --micro_batch_mib")
    parser.add_argument("--streams", default="1,4", help="parallel streams to measure")
    parser.add_argument("--shm_micro_batch_mib", default="",
                        help="micro-batch sizes (MiB) of the shared-memory rows, comma-separated "
                             "(default: --micro_batch_mib and a quarter of it): with shared "
                             "memory the first micro-batch's copy is what the GPU waits for")
    parser.add_argument("--shm_chunk_mib", dest="shm_micro_batch_mib", action=_OldName,
                        help="deprecated: use --shm_micro_batch_mib")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--kernel_tokens_per_s", type=float, default=0,
                        help="the head's kernel-only rate at this shape, for the ratios")
    parser.add_argument("--no_reference", action="store_true",
                        help="skip bench/reference_server.py")
    args = parser.parse_args(argv)

    gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    implementation = "fused_linear" if gpu else "default"
    streams = [int(s) for s in args.streams.split(",")]
    gen = torch.Generator().manual_seed(0)
    length = args.tokens // args.rows
    tokens = length * args.rows
    x = torch.randn(args.rows, length, args.d_model, generator=gen).to(dtype)
    labels = torch.randint(0, args.vocab_size, (args.rows, length), generator=gen)
    job = dict(labels=labels, loss_reduction="sum", return_logits=False,
               loss_implementation=implementation)
    micro_batch_bytes = int(args.micro_batch_mib * (1 << 20))

    rows = []
    if args.kernel_tokens_per_s:  # the baseline, as given
        append_result("transport", d_model=args.d_model, vocab_size=args.vocab_size,
                      tokens=8192, dtype="bf16" if gpu else "fp32",
                      implementation="kernel-only (given: --kernel_tokens_per_s)",
                      baseline="kernel-only", ratio=1.0, tokens_per_s=args.kernel_tokens_per_s)

    def report(what: str, seconds: float):
        rate = tokens / seconds
        ratio = (f", {rate / args.kernel_tokens_per_s:6.1%} of kernel-only"
                 if args.kernel_tokens_per_s else "")
        rows.append((what, rate))
        print(f"{what:<48} {seconds * 1e3:9.1f} ms {rate:12.0f} tokens/s{ratio}", flush=True)
        append_result("transport", d_model=args.d_model, vocab_size=args.vocab_size,
                      tokens=tokens, dtype="bf16" if gpu else "fp32", implementation=what,
                      time_ms=seconds * 1e3,
                      baseline="kernel-only" if args.kernel_tokens_per_s else None,
                      ratio=rate / args.kernel_tokens_per_s if args.kernel_tokens_per_s else None,
                      tokens_per_s=rate)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights = work / "head.safetensors"
        save_file({"norm.weight": torch.ones(args.d_model),
                   "w_out.weight": (torch.randn(args.vocab_size, args.d_model, generator=gen)
                                    / args.d_model ** 0.5).to(dtype)}, str(weights))
        weights.with_suffix(".json").write_text(json.dumps(
            {"name": "default", "layer_norm": {"name": "rms", "eps": 1e-5, "bias": False},
             "bias": False, "dtype": "bfloat16" if gpu else "float32",
             "loss_implementation": implementation}))
        print(f"job: {args.rows} x {length} tokens, d_model {args.d_model}, vocab "
              f"{args.vocab_size}, {str(dtype).split('.')[-1]}, {implementation}, sum, no logits, "
              f"{x.numel() * x.element_size() / 2**20:.0f} MiB of hidden states, micro-batches "
              f"of {args.micro_batch_mib} MiB, device {args.device}", flush=True)
        servers = {"lmhead": Process([args.lmhead, "--host", "127.0.0.1", "--device", args.device,
                                      "--model", f"bench={weights}", "--allow_shared_memory"],
                                     work, "lmhead")}
        if not args.no_reference:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                filter(None, [str(REPO / "client/python"), os.environ.get("PYTHONPATH")])))
            servers["reference"] = Process(
                [sys.executable, str(REPO / "bench/reference_server.py"), "--device", args.device,
                 "--model", f"bench={weights}"], work, "reference", env=env)
        try:
            for name, server in servers.items():
                with RemoteLMHead(server.address, timeout=600, shared_memory="off") as head:
                    for k in streams:
                        report(f"{name}, Python client, {k} stream{'s' if k > 1 else ''}",
                               timed(lambda: head.forward_stream(
                                   x, max_micro_batch_bytes=micro_batch_bytes, parallel_streams=k,
                                   **job),
                                   args.repeat))
            # The same micro-batches through shared memory: written into the client's POSIX
            # buffers, or (CUDA IPC) read by the server from the GPU tensor where it lies.
            shared = [("system shared memory", x)]
            if gpu:
                shared.append(("CUDA IPC", x.to(args.device)))
            for what, hidden in shared:
                sizes = ([float(m) for m in args.shm_micro_batch_mib.split(",")]
                         if args.shm_micro_batch_mib
                         else [args.micro_batch_mib, args.micro_batch_mib / 4])
                for mib in sizes:
                    with RemoteLMHead(servers["lmhead"].address, timeout=600,
                                      shared_memory="on") as head:
                        report(f"lmhead, Python client, {what}, {mib:g} MiB",
                               timed(lambda: head.forward_stream(
                                   hidden, max_micro_batch_bytes=int(mib * (1 << 20)), **job),
                                   args.repeat))
                        used = head._shm.stats["cuda_calls" if hidden.is_cuda else "system_calls"]
                        if used == 0:
                            raise RuntimeError(f"the {what} row did not use it: "
                                               f"{head._shm.stats}")
            if args.cli:
                files = work / "job.safetensors"
                save_file({"x": x, "labels": labels}, str(files))
                for k in streams:
                    command = [args.cli, "forward", "--address", servers["lmhead"].address,
                               "--hidden", str(files), "--hidden_name", "x",
                               "--labels", str(files), "--labels_name", "labels",
                               "--loss_reduction", "sum", "--return_logits", "false",
                               "--loss_implementation", implementation,
                               "--micro_batch_mib", str(args.micro_batch_mib),
                               "--parallel_streams", str(k),
                               "--output", str(work / "out.safetensors")]
                    report(f"lmhead, CLI (file to file), {k} stream{'s' if k > 1 else ''}",
                           timed(lambda: run_cli(command), args.repeat))
        finally:
            for server in servers.values():
                server.stop()
    streamed = [(what, rate) for what, rate in rows if what.endswith(("stream", "streams"))]
    best = {name: max(rate for what, rate in streamed if what.startswith(name + ", Python"))
            for name in servers}
    if "reference" in best:
        print(f"lmhead / reference server (Python client, best of the stream counts): "
              f"{best['lmhead'] / best['reference']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
