"""Shared test configuration for every suite in the workspace."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# The machine CI runs on is shared and noisy: a per-example deadline would fail
# tests for being slow, not wrong. Property tests are bounded by example count.
settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    parent=settings.get_profile("default"),
    max_examples=2_000,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped:
        terminalreporter.write_line(
            f"FAILED: {len(skipped)} test(s) skipped; every suite must run "
            "(start the services they need, install what they use)",
            red=True,
        )


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A skipped suite is a suite that did not run: fail the session for it, so
    # neither a developer nor CI can mistake "skipped" for "passed".
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.stats.get("skipped") and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
