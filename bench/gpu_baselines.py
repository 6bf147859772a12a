"""Liger-Kernel and Cut Cross-Entropy forward on the shapes of gpu_lm_head_bench, with the cuBLAS
x @ W^T time measured in the same process as the baseline. Runs on the GPU machine:

    python3 bench/gpu_baselines.py [--quick]

Prints markdown rows: d, V, N, impl, median ms, TFLOP/s, peak extra MB, ratio to cublas, and
appends them to the table fused_linear_forward under $LMHEAD_RESULTS (bench/results_table.py).
"""

import sys

import torch

from results_table import append_result


def measure_interleaved(fns, rounds):
    """Times implementations of one shape under the same conditions, as gpu_lm_head_bench does:
    each is warmed up alone (2 runs, giving its peak extra memory), then the timed runs alternate,
    one run of each per round. Returns (median ms, min ms, max ms, peak MB) or None (OOM) each."""
    peaks, times = [], [[] for _ in fns]
    for fn in fns:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            fn()
            fn()
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - before) / 1e6)
        except torch.OutOfMemoryError:
            peaks.append(None)
        torch.cuda.empty_cache()
    for _ in range(rounds):
        for fn, peak, ms in zip(fns, peaks, times):
            if peak is None:
                continue
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            ms.append(start.elapsed_time(stop))
    torch.cuda.empty_cache()
    results = []
    for peak, ms in zip(peaks, times):
        ms.sort()
        results.append(None if peak is None else (ms[len(ms) // 2], ms[0], ms[-1], peak))
    return results


def main():
    quick = "--quick" in sys.argv
    print(f"card: {torch.cuda.get_device_name(0)}\n")
    print("| d | V | N | impl | ms (median) | min–max ms | TFLOP/s | peak extra MB | ratio to cublas |")
    print("|---|---|---|---|---|---|---|---|---|")
    impls = {}
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction,
        )

        def liger(x, w, y):
            # OLMo-core's call: bias None, ignore -100, lse_square_scale 1e-4, sum, z-loss on.
            return LigerFusedLinearCrossEntropyFunction.apply(
                x, w, y, None, None, -100, 1e-4, 0.0, "sum", None, True, torch.float32
            )

        impls["liger"] = liger
    except Exception as e:  # noqa: BLE001 - report and go on with the others
        print(f"liger-kernel unavailable: {e}", file=sys.stderr)
    try:
        from cut_cross_entropy import linear_cross_entropy

        impls["cce"] = lambda x, w, y: linear_cross_entropy(x, w, y, reduction="sum")
    except Exception as e:  # noqa: BLE001
        print(f"cut-cross-entropy unavailable: {e}", file=sys.stderr)

    rounds = 5 if quick else 15
    for d in (2048, 4096):
        for v in (128256,) if quick else (100352, 128256, 256000):
            w = torch.randn(v, d, device="cuda", dtype=torch.bfloat16) * 0.02
            for n in (8192,) if quick else (8192, 32768):
                x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
                y = torch.randint(v, (n,), device="cuda")
                flops = 2.0 * n * d * v
                out = torch.empty(n, v, device="cuda", dtype=torch.bfloat16)
                names = ["cublas(py)", *impls]
                fns = [lambda: torch.mm(x, w.t(), out=out)]
                fns += [lambda fn=fn: fn(x, w, y) for fn in impls.values()]
                with torch.no_grad():
                    results = measure_interleaved(fns, rounds)
                del out
                base = results[0][0]
                for name, result in zip(names, results):
                    if result is None:
                        print(f"| {d} | {v} | {n} | {name} | failed (OOM) | | | | |")
                        append_result("fused_linear_forward", d_model=d, vocab_size=v, tokens=n,
                                      dtype="bf16", implementation=f"{name} (out of memory)",
                                      baseline="cublas(py)")
                        continue
                    ms, lo, hi, peak = result
                    append_result("fused_linear_forward", d_model=d, vocab_size=v, tokens=n,
                                  dtype="bf16", implementation=name, time_ms=ms,
                                  baseline="cublas(py)", ratio=ms / base, peak_extra_mb=peak,
                                  tokens_per_s=n / (ms * 1e-3))
                    print(
                        f"| {d} | {v} | {n} | {name} | {ms:.2f} | {lo:.2f}–{hi:.2f} | "
                        f"{flops / ms / 1e9:.0f} | {peak:.0f} | x{ms / base:.3f} |"
                    )
                sys.stdout.flush()


if __name__ == "__main__":
    main()
