"""Benchmarks' machine-readable tables from Python: the columns and rules of
bench/results_table.h (bench/results/README.md). A row is appended to
$LMHEAD_RESULTS/<table>.csv when LMHEAD_RESULTS names a directory; nothing otherwise."""

import csv
import datetime
import math
import os

# bench/results_table.cc's header, in order.
COLUMNS = ("card", "commit", "date", "d_model", "vocab_size", "tokens", "dtype",
           "implementation", "time_ms", "baseline", "ratio", "peak_extra_mb", "tokens_per_s",
           "p99_ms")
_FORMATS = {"time_ms": "{:.3f}", "ratio": "{:.4f}", "peak_extra_mb": "{:.0f}",
            "tokens_per_s": "{:.0f}", "p99_ms": "{:.3f}"}


def append_result(table: str, **fields) -> None:
    """Appends one row: fields named by COLUMNS less card, commit and date (from LMHEAD_CARD,
    LMHEAD_COMMIT and the clock); None or NaN numbers are written as empty fields."""
    directory = os.environ.get("LMHEAD_RESULTS")
    if not directory:
        return
    unknown = set(fields) - set(COLUMNS[3:])
    if unknown:
        raise ValueError(f"append_result: unknown columns {sorted(unknown)}")
    row = {
        "card": os.environ.get("LMHEAD_CARD") or "unknown",
        "commit": os.environ.get("LMHEAD_COMMIT") or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    for name, value in fields.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            row[name] = ""
        elif name in _FORMATS:
            row[name] = _FORMATS[name].format(value)
        else:
            row[name] = str(value)
    path = os.path.join(directory, f"{table}.csv")
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow(row)
