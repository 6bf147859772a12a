"""Parity of our C++ LM head with olmo_core (issue 2).

Runs our //tests/parity:parity_runner once over every case of parity_cases.py (the grid, its
references and the comparison live there, shared with tests/e2e_python) and compares.

Run (LMHEAD_PARITY_RUNNER overrides the runner's path):
  bazel build //tests/parity:parity_runner
  $(tools/venv.sh path)/bin/python -m pytest -q tests/parity
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parity_cases import MIN_CASES, SEED, all_cases, compare, expectation, materialize

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(
    os.environ.get("LMHEAD_PARITY_RUNNER", REPO / "bazel-bin/tests/parity/parity_runner")
)

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
        expectations.append(expectation(case, m))
    assert len(set(ids)) == len(ids)

    cases_json, results_json = tmp_path / "cases.json", tmp_path / "results.json"
    cases_json.write_text(json.dumps({"cases": entries}))
    proc = subprocess.run(
        [str(RUNNER), "--cases", str(cases_json), "--results", str(results_json)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"parity_runner failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    results = json.loads(results_json.read_text())

    failures = []
    sources = {}
    for case, case_id, entry, expected in zip(cases, ids, entries, expectations):
        sources[expected.source] = sources.get(expected.source, 0) + 1
        if case_id not in results:
            failures.append((case_id, case, ["no result from the runner"]))
            continue
        result = results[case_id]
        got_code = "OK" if result.get("ok") else result.get("code", "?")
        problems = compare(case, expected, got_code, result.get("message", ""),
                           lambda: load_file(entry["output"]))
        if problems:
            failures.append((case_id, case, problems))

    for case_id, case, problems in failures:
        print(f"\nFAIL {case_id}: {case.describe()}")
        for p in problems:
            print(f"    {p}")
    passed, failed = len(cases) - len(failures), len(failures)
    print(f"\nreferences: {sources}")
    parity_summary.update(passed=passed, failed=failed)
    assert failed == 0, f"{failed} of {len(cases)} parity cases failed (listed above)"
    assert passed >= MIN_CASES, f"only {passed} distinct cases, need {MIN_CASES}"
