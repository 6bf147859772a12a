"""The parity grid of tests/parity, through the real server and the Python client (issue 3).

Every case of parity_cases.py becomes a model file (weights + LMHeadConfig JSON beside them);
one lmhead_server loads them all, and RemoteLMHead.forward runs each case's call. The outputs
are compared with olmo_core (or the fp64 reference) by parity_cases.compare: same references,
tolerances and status codes, the codes now gRPC's.

Where the wire differs from calling the core directly:
- Heads that cannot be built are refused when the server loads them: each such case starts a
  server with that model alone, which must exit naming the expected code.
- Hidden states of another dtype than the head's are cast by the service (docs/API.md,
  "Hidden states"), so those cases' reference is olmo_core on the cast input.
- A loss_reduction outside mean/sum/none has no wire value: the client raises ValueError, as
  upstream does; counted as skipped.
"""

import dataclasses
import json

import torch
from safetensors.torch import save_file

from server_process import run_server_to_exit
from lmhead_client import LMHeadError, RemoteLMHead
from parity_cases import (FIELDS, SEED, TORCH_DTYPES, Case, Expected, Materialized, all_cases,
                          compare, expectation, materialize)

REDUCTION_SKIP = "loss_reduction outside mean/sum/none has no wire value (client ValueError)"


def _is_load_time(m: Materialized, expected: Expected) -> bool:
    """The head cannot be built: olmo_core refuses it, or our core does (docs/SPEC.md §5)."""
    return m.head is None or expected.source == "spec"


def _write_model(case: Case, index: int, m: Materialized, entry: dict, tmp) -> str:
    """The model's weights path, with its config JSON beside it. Heads that cannot be built
    get a bare w_out.weight, from which the server takes d_model and vocab_size."""
    weights = tmp / f"model{index:04d}.safetensors"
    if m.head is not None:
        save_file({k: v.contiguous() for k, v in m.head.state_dict().items()}, str(weights))
    else:
        save_file({"w_out.weight": torch.zeros(case.V, case.D, dtype=TORCH_DTYPES[case.dtype])},
                  str(weights))
    weights.with_suffix(".json").write_text(json.dumps(entry["config"]))
    return str(weights)


def _forward(head: RemoteLMHead, case: Case, m: Materialized):
    """(code, message, outputs): what the server answered to the case's call."""
    try:
        out = head.forward(
            m.x, labels=m.labels, ignore_index=case.ignore_index, loss_reduction=case.reduction,
            z_loss_multiplier=case.zml, loss_div_factor=m.div, return_logits=case.return_logits,
            logits_to_keep=m.keep, loss_implementation=case.impl_option,
            logit_tile_bytes=case.tile_bytes)
    except LMHeadError as e:
        return e.code.name, e.details, {}
    if isinstance(out, torch.Tensor):
        out = {"logits": out}
    else:
        out = {name: getattr(out, name) for name in FIELDS}
    return "OK", "", {k: v for k, v in out.items() if v is not None}


def test_grpc_parity(tmp_path, start_server, grpc_parity_summary):
    torch.manual_seed(SEED)
    cases = all_cases()
    served, load_time, skipped = [], [], {}
    for index, case in enumerate(cases):
        m, entry = materialize(case, index, tmp_path)
        expected = expectation(case, m)
        if case.x_dtype is not None and m.head is not None:
            cast = dataclasses.replace(m, x=m.x.to(TORCH_DTYPES[case.dtype]))
            expected = expectation(case, cast)
            expected.why = f"{expected.why} (x cast to the head's dtype by the service)"
        if case.reduction not in ("mean", "sum", "none"):
            skipped.setdefault(REDUCTION_SKIP, []).append((index, case, m))
            continue
        weights = _write_model(case, index, m, entry, tmp_path)
        target = load_time if _is_load_time(m, expected) else served
        target.append((index, case, m, expected, f"c{index:04d}", weights))

    failures = []
    # Heads that cannot be built: the server must refuse to start, naming the code.
    for index, case, m, expected, name, weights in load_time:
        proc = run_server_to_exit(["--model", f"{name}={weights}"])
        if proc.returncode == 0 or f"cannot start: {expected.code}: model '{name}'" not in proc.stderr:
            failures.append((index, case, [f"expected the server to refuse the model with "
                                           f"{expected.code} ({expected.source}: {expected.why}); "
                                           f"exit {proc.returncode}: {proc.stderr[-600:]}"]))

    # Everything else through one server.
    server = start_server([f"--model={name}={weights}" for *_, name, weights in served])
    for index, case, m, expected, name, _ in served:
        with RemoteLMHead(server.address, model=name, timeout=60) as head:
            code, message, outputs = _forward(head, case, m)
        problems = compare(case, expected, code, message, lambda: outputs)
        if problems:
            failures.append((index, case, problems))

    # No wire value: the client must refuse as upstream does.
    checked = len(served) + len(load_time)
    with RemoteLMHead(server.address, timeout=60) as head:
        for index, case, m in skipped.get(REDUCTION_SKIP, []):
            try:
                head.forward(m.x, labels=m.labels, loss_reduction=case.reduction)
            except ValueError:
                continue
            failures.append((index, case, ["the client accepted an unknown loss_reduction"]))
            checked += 1

    for index, case, problems in failures:
        print(f"\nFAIL {index:04d}: {case.describe()}")
        for p in problems:
            print(f"    {p}")
    print(f"\nchecked {len(served)} cases over Forward and {len(load_time)} refused at load; "
          f"{sum(map(len, skipped.values()))} skipped")
    grpc_parity_summary.update(passed=checked - len(failures), failed=len(failures),
                               skipped={k: len(v) for k, v in skipped.items()})
    assert not failures, f"{len(failures)} of {checked} gRPC parity cases failed (listed above)"
