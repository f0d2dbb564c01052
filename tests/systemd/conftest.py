"""Fixtures for the systemd tests: the cached image, and a site (the
central container) per test module. Prints each test's time at the end."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.systemd import image as image_builder
from tests.systemd.site import Site

HERE = Path(__file__).resolve().parent
TIMINGS = pytest.StashKey[list[tuple[str, float]]]()
NOTES = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def note(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """Record a measurement for the summary at the end of the run."""

    def record(line: str) -> None:
        pytestconfig.stash.setdefault(NOTES, []).append(line)

    return record


@pytest.fixture(scope="session")
def image() -> Path:
    """The project's Debian root (built once, then cached)."""
    if os.geteuid() != 0:
        pytest.fail("the systemd tests boot containers: run them as root", pytrace=False)
    try:
        image_builder.require_tools(["systemd-nspawn", "ip", "nsenter"])
        return image_builder.project_image()
    except image_builder.ImageError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="module")
def site(
    image: Path, tmp_path_factory: pytest.TempPathFactory, note: Callable[[str], None]
) -> Iterator[Site]:
    started = time.monotonic()
    built = Site(image, tmp_path_factory.mktemp("site"))
    note(f"central container booted and set up in {time.monotonic() - started:.1f} s")
    try:
        yield built
    finally:
        built.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The first test here may build the image (base 73 s, project layer
    26 s, more on a slow mirror) before it boots anything: a budget that
    covers that, for every test here without one of its own."""
    for item in items:
        if HERE in item.path.parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(600))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    if HERE not in item.path.parents:
        return (yield)
    started = time.monotonic()
    try:
        return (yield)
    finally:
        item.config.stash.setdefault(TIMINGS, []).append((item.nodeid, time.monotonic() - started))


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    timings = config.stash.get(TIMINGS, [])
    if not timings:
        return
    notes = config.stash.get(NOTES, [])
    if notes:
        terminalreporter.section("systemd tests: measurements")
        for line in notes:
            terminalreporter.write_line(line)
    terminalreporter.section("systemd tests: time per test (setup, call, teardown)")
    for nodeid, seconds in timings:
        terminalreporter.write_line(f"{seconds:7.1f} s  {nodeid}")
    terminalreporter.write_line(f"{sum(s for _, s in timings):7.1f} s  in all")
