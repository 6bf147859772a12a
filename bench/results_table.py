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
# One name per dtype in every table, as the CLI spells them.
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
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
    if fields.get("dtype") in _DTYPES:
        fields["dtype"] = _DTYPES[fields["dtype"]]
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


def markdown(path: str) -> str:
    """The table at `path` as markdown, for docs/BENCHMARKS.md: the columns that have a value in
    some row, card, commit and date above the table when all rows share them."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return ""
    shared = [c for c in ("card", "commit", "date") if len({r[c] for r in rows}) == 1]
    if "date" not in shared:  # one run's rows share the day
        days = {r["date"][:10] for r in rows}
        heading_date = days.pop() if len(days) == 1 else None
    else:
        heading_date = rows[0]["date"][:10]
    columns = [c for c in COLUMNS if c not in ("card", "commit", "date")
               and any(r[c] for r in rows)]
    heading = ", ".join(x for x in (rows[0]["card"] if "card" in shared else None,
                                    rows[0]["commit"] if "commit" in shared else None,
                                    heading_date) if x)
    lines = [f"**{heading}**", "", "| " + " | ".join(columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(r[c] for c in columns) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit("usage: python3 bench/results_table.py TABLE.csv...  (prints each as markdown)")
    print("\n\n".join(markdown(p) for p in sys.argv[1:]))
