"""Parity of our C++ LM head with olmo_core (issue 2).

Runs our //tests/parity:parity_runner once over every case of parity_cases.py (the grid, its
references and the comparison live there, shared with tests/e2e_python) and compares.

Run (LMHEAD_PARITY_RUNNER overrides the runner's path):
  bazel build //tests/parity:parity_runner
  $(tools/venv.sh path)/bin/python -m pytest -q tests/parity

On a GPU (tools/gpu/test.sh parity): LMHEAD_PARITY_DEVICE=cuda:0 runs our head there
(parity_runner --device) and compares it with olmo_core on the same GPU, its PyTorch path and its
Liger path (parity_cases.device_expectation), and reports by implementation and dtype.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parity_cases import (MIN_CASES, SEED, all_cases, compare, device_expectation, error_stats,
                          expectation, materialize)

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(
    os.environ.get("LMHEAD_PARITY_RUNNER", REPO / "bazel-bin/tests/parity/parity_runner")
)
DEVICE = os.environ.get("LMHEAD_PARITY_DEVICE", "cpu")

# ---------------------------------------------------------------------------------------------
# The test


def test_parity(tmp_path, parity_summary):
    if not RUNNER.exists():
        pytest.skip(f"parity runner not built: {RUNNER} is missing (run `bazel build "
                    "//tests/parity:parity_runner`, or set LMHEAD_PARITY_RUNNER)")
    torch.manual_seed(SEED)
    cases = all_cases()
    ids, entries, expectations = [], [], []
    for index, case in enumerate(cases):
        m, entry = materialize(case, index, tmp_path)
        case_id = f"{index:04d}-{case.head}-{case.effective_impl}-{case.reduction or 'empty'}"
        entry["id"] = case_id
        ids.append(case_id)
        entries.append(entry)
        expectations.append(expectation(case, m) if DEVICE == "cpu"
                            else device_expectation(case, m, DEVICE))
    assert len(set(ids)) == len(ids)

    cases_json, results_json = tmp_path / "cases.json", tmp_path / "results.json"
    cases_json.write_text(json.dumps({"cases": entries}))
    device_flag = [] if DEVICE == "cpu" else ["--device", DEVICE]
    proc = subprocess.run(
        [str(RUNNER), "--cases", str(cases_json), "--results", str(results_json)] + device_flag,
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"parity_runner failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    results = json.loads(results_json.read_text())

    failures = []
    sources = {}
    groups = {}  # on a GPU: (implementation, dtype) -> counts and error statistics
    for case, case_id, entry, expected in zip(cases, ids, entries, expectations):
        sources[expected.source] = sources.get(expected.source, 0) + 1
        if case_id not in results:
            failures.append((case_id, case, ["no result from the runner"]))
            continue
        result = results[case_id]
        got_code = "OK" if result.get("ok") else result.get("code", "?")
        notes = []
        problems = compare(case, expected, got_code, result.get("message", ""),
                           lambda: load_file(entry["output"]), notes)
        if problems:
            failures.append((case_id, case, problems))
        if DEVICE != "cpu":
            _tally(groups, case, expected, got_code, entry, problems, notes)
            for note in notes:
                print(f"fp64 rule {case_id}: {note} ({case.describe()})")

    for case_id, case, problems in failures:
        print(f"\nFAIL {case_id}: {case.describe()}")
        for p in problems:
            print(f"    {p}")
    passed, failed = len(cases) - len(failures), len(failures)
    print(f"\nreferences: {sources}")
    parity_summary.update(passed=passed, failed=failed)
    if DEVICE != "cpu":
        name = torch.cuda.get_device_name(DEVICE) if DEVICE.startswith("cuda") else DEVICE
        parity_summary.update(device=DEVICE, device_name=name, groups=groups)
    assert failed == 0, f"{failed} of {len(cases)} parity cases failed (listed above)"
    assert passed >= MIN_CASES, f"only {passed} distinct cases, need {MIN_CASES}"


def _tally(groups: dict, case, expected, got_code: str, entry: dict, problems: list,
           notes: list) -> None:
    """Counts a GPU case under (effective implementation, dtype), with the largest errors of
    the cases compared by value with upstream on the GPU."""
    g = groups.setdefault((case.effective_impl, case.dtype), {
        "passed": 0, "failed": 0, "by_value": 0, "fp64_rule": 0,
        "ratio": (0.0, ""), "ours_rel": 0.0, "upstream_rel": 0.0})
    g["failed" if problems else "passed"] += 1
    g["fp64_rule"] += bool(notes) and not problems
    if expected.code != "OK" or got_code != "OK" or "@cuda" not in expected.source:
        return
    g["by_value"] += 1
    for name, (ratio, ours_rel, upstream_rel) in error_stats(
            case, expected, load_file(entry["output"])).items():
        if ratio > g["ratio"][0]:
            g["ratio"] = (ratio, f"{name} of {entry['id']}")
        if ours_rel == ours_rel:  # not NaN
            g["ours_rel"] = max(g["ours_rel"], ours_rel)
            g["upstream_rel"] = max(g["upstream_rel"], upstream_rel)
