"""Prints the parity suite's one-line result (`parity: N passed, M failed`) in pytest's summary;
on a GPU `gpu parity vs olmo_core: N passed, M failed`, then one line per implementation and
dtype."""

import pytest

_SUMMARY = pytest.StashKey[dict]()


@pytest.fixture
def parity_summary(pytestconfig) -> dict:
    """A dict the parity test fills with its `passed` and `failed` counts."""
    return pytestconfig.stash.setdefault(_SUMMARY, {})


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    summary = config.stash.get(_SUMMARY, {})
    if "passed" in summary and "device" not in summary:
        passed, failed = summary["passed"], summary["failed"]
        terminalreporter.write_line(f"parity: {passed} passed, {failed} failed")
    elif "passed" in summary:  # on a GPU, against olmo_core on the same GPU
        passed, failed = summary["passed"], summary["failed"]
        terminalreporter.write_line(f"gpu parity vs olmo_core: {passed} passed, {failed} failed "
                                    f"({summary['device']}, {summary['device_name']})")
        for (impl, dtype), g in sorted(summary["groups"].items()):
            ratio, where = g["ratio"]
            terminalreporter.write_line(
                f"gpu parity vs olmo_core [{impl}, {dtype}]: {g['passed']} passed, "
                f"{g['failed']} failed ({g['by_value']} by value, {g['fp64_rule']} of them by "
                f"the fp64 rule); worst |ours - upstream| {ratio:.3g} x tolerance ({where}); "
                f"max rel. error vs float64: ours {g['ours_rel']:.3g}, upstream "
                f"{g['upstream_rel']:.3g}")
