"""Prints the parity suite's one-line result (`parity: N passed, M failed`) in pytest's summary."""

import pytest

_SUMMARY = pytest.StashKey[dict]()


@pytest.fixture
def parity_summary(pytestconfig) -> dict:
    """A dict the parity test fills with its `passed` and `failed` counts."""
    return pytestconfig.stash.setdefault(_SUMMARY, {})


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    summary = config.stash.get(_SUMMARY, {})
    if "passed" in summary:
        passed, failed = summary["passed"], summary["failed"]
        terminalreporter.write_line(f"parity: {passed} passed, {failed} failed")
