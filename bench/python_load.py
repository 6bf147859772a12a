"""Closed-loop load from the Python client against a running lmhead_server.

--processes x --threads callers (each with its own RemoteLMHead per process) send Forward calls
of --tokens bf16 tokens with labels (fused_linear, reduction sum, no logits) back to back for
--seconds after --warmup_seconds, and print tokens/s, p50/p99 latency and refusals: the Python
client's figure beside bench/load_generator.cc's (issue 12's serving benchmark).

    PYTHONPATH=client/python python3 bench/python_load.py --address 127.0.0.1:50051
"""

import argparse
import multiprocessing as mp
import threading
import time

import numpy as np
import torch

from lmhead_client import LMHeadError, RemoteLMHead
from results_table import append_result


def _caller_process(args, start_at: float, results) -> None:
    head = RemoteLMHead(args.address, timeout=60, max_attempts=1)
    rng = np.random.default_rng()
    x = torch.randn(1, args.tokens, args.d_model).to(torch.bfloat16)
    labels = torch.from_numpy(rng.integers(0, args.vocab_size, size=(1, args.tokens)))
    measure_from = start_at + args.warmup_seconds
    measure_until = measure_from + args.seconds
    latencies, refusals, lock = [], [0], threading.Lock()

    def loop() -> None:
        while True:
            sent = time.monotonic()
            if sent >= measure_until:
                return
            refused = False
            try:
                head.forward(x, labels=labels, loss_reduction="sum", return_logits=False,
                             loss_implementation="fused_linear")
            except LMHeadError:
                refused = True
            answered = time.monotonic()
            if sent >= measure_from and answered <= measure_until:
                with lock:
                    if refused:
                        refusals[0] += 1
                    else:
                        latencies.append(answered - sent)

    threads = [threading.Thread(target=loop) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put((latencies, refusals[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--threads", type=int, default=8, help="callers per process")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--d_model", type=int, default=4096)
    parser.add_argument("--vocab_size", type=int, default=128256)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup_seconds", type=float, default=3)
    parser.add_argument("--label", default="")
    parser.add_argument("--kernel_tokens_per_s", type=float, default=0,
                        help="the kernel-only rate to print this run's share of (0: none)")
    args = parser.parse_args()

    context = mp.get_context("spawn")
    results = context.Queue()
    start_at = time.monotonic() + 2  # room for the processes to start
    processes = [context.Process(target=_caller_process, args=(args, start_at, results))
                 for _ in range(args.processes)]
    for process in processes:
        process.start()
    latencies, refusals = [], 0
    for _ in processes:
        got, refused = results.get()
        latencies += got
        refusals += refused
    for process in processes:
        process.join()
    ms = np.sort(np.array(latencies) * 1000)
    p50 = float(np.percentile(ms, 50)) if len(ms) else 0.0
    p99 = float(np.percentile(ms, 99)) if len(ms) else 0.0
    rate = len(ms) * args.tokens / args.seconds
    share = rate / args.kernel_tokens_per_s if args.kernel_tokens_per_s else None
    print(f"python load {args.label}: callers={args.processes * args.threads} "
          f"tokens={args.tokens} bf16 fused_linear: {len(ms)} ok calls in {args.seconds:.0f} s, "
          f"{rate:.0f} tokens/s" + (f" ({share:.1%} of kernel-only)" if share else "") +
          f", latency p50 {p50:.1f} ms p99 {p99:.1f} ms, refusals {refusals}")
    append_result("serving", d_model=args.d_model, vocab_size=args.vocab_size, tokens=args.tokens,
                  dtype="bf16", implementation=f"Python load, {args.processes * args.threads} "
                  f"callers: {args.label}", time_ms=p50, baseline="kernel-only" if share else None,
                  ratio=share, tokens_per_s=rate, p99_ms=p99)


if __name__ == "__main__":
    main()
