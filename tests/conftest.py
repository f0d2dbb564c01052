"""Shared test configuration for every suite in the workspace."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests import postgres

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


POSTGRES_URL = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def postgres_admin_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The admin URL (database ``postgres``) of the PostgreSQL server every
    test that needs one shares: the configured server if it answers, else a
    throw-away cluster that lives as long as the session.

    Only a machine without PostgreSQL at all fails: the first test that needs
    it errors with one line saying what to install, and the session stops
    there rather than repeating that line for every such test."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(postgres.server())
        except postgres.PostgresNotInstalled as error:
            request.session.shouldstop = str(error)
            raise pytest.fail.Exception(str(error), pytrace=False) from None
        request.config.stash[POSTGRES_URL] = url
        yield url


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    url = config.stash.get(POSTGRES_URL, None)
    if url is not None and url != postgres.configured_url():
        terminalreporter.write_line(
            f"PostgreSQL: nothing answered at {postgres.configured_url()}; "
            f"the tests used a throw-away cluster at {url}"
        )
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
