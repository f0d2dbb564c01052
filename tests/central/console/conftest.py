"""The console in a real browser: Debian's Chromium driven by Playwright,
against the real server on a loopback port, on SQLite and on PostgreSQL.

The server runs in a thread of its own (its own event loop), so the
browser tests stay plain synchronous Playwright code; ``console.run(coro)``
runs a coroutine (seeding through the API, as a partner or an appliance) on
the server's loop. Accessibility is checked with axe-core from the npm
registry, injected into each page; screenshots of every page at both widths
go to ``test-output/console/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyotp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from msp_central.app import create_app
from msp_central.config import Settings
from msp_central.console.accounts import create_user
from msp_central.context import CENTRAL
from tests.central.support import ROOT, Clock, Harness, KeyClient, ThreadLoop

T = TypeVar("T")

CHROMIUM = os.environ.get("MSP_TEST_CHROMIUM", "/usr/bin/chromium")
AXE_VERSION = "4.14.1"
REPOSITORY = Path(__file__).resolve().parents[3]
SCREENSHOTS = REPOSITORY / "test-output" / "console"
DESKTOP = {"width": 1366, "height": 768}
PHONE = {"width": 390, "height": 844}
PASSWORD = "correct horse battery staple"
# axe-core rules at these levels fail a page.
SERIOUS = ("serious", "critical")


def read_qr(png: bytes) -> str:
    """The text of the one QR code in a PNG image, read by ZBar (Debian's
    zbar-tools), a reader with no part in drawing it."""
    if shutil.which("zbarimg") is None:
        pytest.fail("zbarimg not found: install Debian's zbar-tools", pytrace=False)
    result = subprocess.run(
        ["zbarimg", "--raw", "--quiet", "-Sdisable", "-Sqrcode.enable", "-"],
        input=png,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, f"no QR code read: {result.stderr.decode()[-300:]}"
    return result.stdout.decode().rstrip("\n")


@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's chromium package")
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
        ],
    )
    yield browser
    browser.close()


@pytest.fixture(scope="session")
def axe_source(tmp_path_factory: pytest.TempPathFactory) -> str:
    """axe-core's browser bundle, installed from the npm registry once per
    machine (kept in the user's cache directory)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "msp-tests"
    script = cache / f"axe-core-{AXE_VERSION}" / "node_modules" / "axe-core" / "axe.min.js"
    if not script.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is needed to fetch axe-core for the accessibility checks")
        target = script.parents[2]
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                npm,
                "install",
                "--no-save",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(target),
                f"axe-core@{AXE_VERSION}",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return script.read_text(encoding="utf-8")


@dataclass
class Console:
    """The running server, its partner, and helpers for the browser."""

    url: str
    backend: str
    loop: ThreadLoop
    harness: Harness
    partner: KeyClient
    browser: Browser
    axe_source: str
    pages: list[Page] = field(default_factory=list)

    @property
    def clock(self) -> Clock:
        return self.harness.clock

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return self.loop.run(coroutine, timeout)

    def user(
        self, role: str = "admin", *, email: str | None = None, partner: KeyClient | None = None
    ) -> str:
        """A console user of the partner (``partner`` or the default one) with
        the password :data:`PASSWORD`; returns the e-mail address."""
        owner = partner or self.partner
        email = email or f"{role}-{len(self.pages)}-{os.urandom(3).hex()}@acme.example"

        async def make() -> None:
            async with self.harness.engine.begin() as connection:
                assert owner.partner_id
                await create_user(
                    connection,
                    partner_id=owner.partner_id,
                    email=email,
                    password=PASSWORD,
                    role=role,  # type: ignore[arg-type]
                    actor="test",
                    now=self.clock(),
                )

        self.run(make())
        return email

    def new_page(self, viewport: dict[str, int] | None = None) -> Page:
        context = self.browser.new_context(viewport=viewport or DESKTOP, base_url=self.url)
        page = context.new_page()
        page.set_default_timeout(15_000)
        self.pages.append(page)
        return page

    def sign_in(self, page: Page, email: str, password: str = PASSWORD) -> None:
        page.goto("/console/sign-in")
        page.get_by_label("E-mail address").fill(email)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_load_state()

    def signed_in(self, role: str = "admin", viewport: dict[str, int] | None = None) -> Page:
        """A new browser page with a user of ``role`` signed in."""
        page = self.new_page(viewport)
        self.sign_in(page, self.user(role))
        return page

    def totp_code(self, secret: str) -> str:
        """The code an authenticator app shows now (by the server's clock)."""
        return pyotp.TOTP(secret).at(self.clock())

    def open(self, page: Page, path: str) -> None:
        """Open a console page and wait until its module has filled it."""
        page.goto(path)
        page.wait_for_selector('#page[aria-busy="false"]')

    def axe(self, page: Page) -> list[dict[str, Any]]:
        """Serious and critical axe-core violations on the page as it is now."""
        page.evaluate(self.axe_source)
        result = page.evaluate(
            "async () => { const r = await axe.run(document, {resultTypes: ['violations']});"
            " return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
            " nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))})); }"
        )
        return [v for v in result if v["impact"] in SERIOUS]

    def check_accessible(self, page: Page) -> None:
        violations = self.axe(page)
        assert not violations, json.dumps(violations, indent=1)

    def screenshot(self, page: Page, name: str) -> None:
        """Save the page at desktop and phone width (full page)."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^a-z0-9-]+", "-", name.lower())
        original = page.viewport_size
        for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
            page.set_viewport_size(size)
            page.wait_for_timeout(100)
            page.screenshot(path=SCREENSHOTS / f"{safe}-{self.backend}-{label}.png", full_page=True)
        if original:
            page.set_viewport_size(original)


@pytest.fixture
def console(
    request: pytest.FixtureRequest,
    database_url: str,
    tmp_path: Path,
    browser: Browser,
    axe_source: str,
) -> Iterator[Console]:
    backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    settings = Settings(state_dir=tmp_path / "state", database_url=database_url)
    loop = ThreadLoop()
    clock = Clock()

    async def start() -> tuple[TestClient[Any, Any], Harness]:
        app = create_app(settings, root=ROOT, clock=clock)
        client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        return client, Harness(client, app[CENTRAL].engine, clock)

    client, harness = loop.run(start())
    partner = loop.run(harness.partner("Acme MSP"))
    console = Console(
        url=str(client.make_url("")).rstrip("/"),
        backend=backend,
        loop=loop,
        harness=harness,
        partner=partner,
        browser=browser,
        axe_source=axe_source,
    )
    try:
        yield console
    finally:
        for page in console.pages:
            page.context.close()
        loop.run(client.close())
        loop.stop()
