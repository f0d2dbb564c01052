"""Schemathesis fuzzes the live server from its own OpenAPI document, on
SQLite and on PostgreSQL, as the admin, as a partner and with no
credentials at all.

The server runs on a loopback port in a thread of its own (its own event
loop); the world of :func:`tests.central.test_authz.build_world` gives the
paths something to name, so that half of the generated requests reach the
handlers with real identifiers instead of stopping at "not found". Every
operation is fuzzed with data the document allows (the server must accept
it) and with data it forbids (the server must refuse it), and every answer
goes through every Schemathesis check: no server error, a documented status,
content type, headers and body. The run is bounded (a fixed number of
examples per operation, a derandomized seed) so that it fits in CI; a finding
becomes a focused regression test in ``test_fuzz_findings.py``.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS
from schemathesis.core.failures import FailureGroup
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import positive_data_acceptance

from msp_central.app import create_app
from msp_central.config import Settings
from msp_central.context import CENTRAL
from msp_central.openapi import document
from tests.central.support import ROOT, Clock, Harness, ThreadLoop
from tests.central.test_authz import World, build_world

# Refusals of valid data for rules a JSON Schema cannot state: they relate a
# value to the stored world or to another value. Each is (operation, problem
# detail pattern); anything else the document allows must be accepted.
CROSS_FIELD_RULES: tuple[tuple[str, str], ...] = (
    # The catalogue's controls of each framework are data, not schema.
    ("POST /api/v1/sites/{site_id}/manual-evidence", r"^framework \S+ has no control "),
    ("POST /api/v1/sites/{site_id}/manual-evidence", r"^expires_at is in the past$"),
    # A period ends after it starts, and lies after the earliest year.
    ("GET /api/v1/sites/{site_id}/auditor-package", r"^the period must "),
    # Which frameworks a site uses is its settings, not schema.
    ("GET /api/v1/sites/{site_id}/auditor-package", r"^framework .* is not one this site uses$"),
    ("POST /api/v1/sites/{site_id}/manual-evidence", r"^framework \S+ is not one this site uses$"),
    ("GET /api/v1/sites/{site_id}/posture", r"^framework .* is not one this site uses$"),
    ("GET /api/v1/sites/{site_id}/posture/oscal", r"^framework .* is not one this site uses$"),
    ("GET /api/v1/sites/{site_id}/posture/trend", r"^framework .* is not one this site uses$"),
    # A webhook URL: an absolute http(s) URL with a host, as yarl parses it.
    ("POST /api/v1/notification-channels", r"^the webhook URL "),
)

# Examples per operation, caller and generation mode (valid, invalid data).
EXAMPLES = 4
CALLERS = ("admin", "partner", "anonymous")


class Live:
    """The running server and the world seeded into it."""

    def __init__(self, settings: Settings) -> None:
        self.loop = ThreadLoop()
        clock = Clock()

        async def start() -> tuple[TestClient[Any, Any], World]:
            app = create_app(settings, root=ROOT, clock=clock)
            client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
            await client.start_server()
            world = await build_world(Harness(client, app[CENTRAL].engine, clock))
            return client, world

        self.client, self.world = self.loop.run(start())
        self.url = str(self.client.make_url("")).rstrip("/")

    def close(self) -> None:
        self.loop.run(self.client.close())
        self.loop.stop()


_REGEX_STRATEGIES: dict[tuple[Any, ...], st.SearchStrategy[str]] = {}
_FROM_REGEX = st.from_regex


def _from_regex(
    regex: str | re.Pattern[str], *, fullmatch: bool = False, alphabet: Any = None
) -> st.SearchStrategy[str]:
    """Hypothesis's ``from_regex``, built once per pattern: a name's pattern
    names every invisible character, two planes of private use included, and
    Hypothesis spends seconds on each build of it; Schemathesis builds one
    per generated case."""
    source, flags = (regex.pattern, regex.flags) if isinstance(regex, re.Pattern) else (regex, 0)
    key = (source, flags, fullmatch, repr(alphabet))
    if key not in _REGEX_STRATEGIES:
        _REGEX_STRATEGIES[key] = _FROM_REGEX(regex, fullmatch=fullmatch, alphabet=alphabet)
    return _REGEX_STRATEGIES[key]


@pytest.fixture
def live(database_url: str, tmp_path: Path) -> Iterator[Live]:
    # Schemathesis probes each operation with one made-up key and wants the
    # refusal (401) itself: failures are counted generously here. The
    # throttle's 429 is covered by test_credential_throttling.py; the
    # anonymous caller sends no credential, which is never counted.
    settings = Settings(
        state_dir=tmp_path / "state",
        database_url=database_url,
        credential_identity_failures=1000,
        credential_source_failures=1_000_000,
        credential_source_flood=1_000_000,
        credential_alert_failures=1_000_000,
    )
    server = Live(settings)
    try:
        yield server
    finally:
        server.close()


def identifiers(world: World) -> dict[str, str]:
    """Real values for every path parameter of the document: partner A's
    objects. The API key is the second one (revoking it leaves the caller's
    own key working)."""
    return {
        "site_id": world.site,
        "appliance_id": world.app.appliance_id,
        "framework_id": "hipaa",
        "token_id": world.token_id,
        "key_id": world.key_id,
        "user_id": world.user_id,
        "invite_id": world.invite_id,
        "bundle_id": world.bundle_id,
        "attachment_id": world.attachment_id,
        "serial": world.target.serial,
        "escalation_id": world.escalation_id,
        "channel_id": world.channel_id,
        "kind": "config",
    }


def headers_of(world: World, caller: str) -> dict[str, str]:
    if caller == "admin":
        return {"Authorization": f"Bearer {world.admin.key}"}
    if caller == "partner":
        return {"Authorization": f"Bearer {world.partner.key}"}
    return {}


def without_forged_cursor(case: schemathesis.Case) -> schemathesis.Case:
    """Valid data carries no cursor. A cursor is opaque: the document can
    say its alphabet, not which strings the server issued (a forged one is a
    400 by design, see msp_central.pagination), so only invalid-data cases
    keep the generated one."""
    meta = case.meta
    if meta is not None and meta.generation.mode.is_positive and case.query:
        case.query.pop("cursor", None)
    return case


def valid_data_accepted(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """Schemathesis's ``positive_data_acceptance``, but for a 400 that names
    one of the :data:`CROSS_FIELD_RULES` of the operation."""
    if response.status_code == 400:
        detail = str(response.json().get("detail", ""))
        label = f"{case.method.upper()} {case.operation.path}"
        if any(op == label and re.search(rule, detail) for op, rule in CROSS_FIELD_RULES):
            return None
    return positive_data_acceptance(ctx, response, case)


def fuzz_operation(
    operation: APIOperation, url: str, headers: dict[str, str], real: dict[str, str]
) -> int:
    """Fuzz one operation; returns how many cases were sent. A failed check
    raises (Schemathesis's failure group, naming every failed check)."""
    names = {p.name for p in operation.path_parameters}
    known = {name: value for name, value in real.items() if name in names}
    strategy = st.one_of(
        *(
            operation.as_strategy(generation_mode=mode, path_parameters=known)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        ),
        *(operation.as_strategy(generation_mode=mode) for mode in GenerationMode),
    ).map(without_forged_cursor)
    sent = 0

    @settings(
        max_examples=EXAMPLES * 2,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        # Invalid data is drawn by rejecting valid data, and the server is
        # slow next to Hypothesis: neither is a finding.
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        nonlocal sent
        sent += 1
        case.call_and_validate(
            base_url=url,
            headers=headers,
            checks=[check for check in CHECKS.get_all() if check is not positive_data_acceptance],
            additional_checks=[valid_data_accepted],
        )

    run()
    return sent


@pytest.mark.timeout(600)
@pytest.mark.parametrize("caller", CALLERS)
def test_fuzz(live: Live, caller: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "from_regex", _from_regex)
    # The document as the server serves it. Loaded from a dictionary, not
    # from its URL: Schemathesis leaves out the operation serving the
    # document it was loaded from, and that one is fuzzed too.
    with urllib.request.urlopen(f"{live.url}/api/v1/openapi.json", timeout=30) as served:
        schema = schemathesis.openapi.from_dict(json.load(served))
    real = identifiers(live.world)
    headers = headers_of(live.world, caller)
    operations = [result.ok() for result in schema.get_all_operations()]
    # Every operation of the document is fuzzed: none is left out unseen.
    documented = {f"{m.upper()} {p}" for p, methods in document()["paths"].items() for m in methods}
    assert {operation.label for operation in operations} == documented
    failures: list[str] = []
    sent = 0
    started = time.monotonic()
    for operation in operations:
        try:
            sent += fuzz_operation(operation, live.url, headers, real)
        except (Exception, FailureGroup) as error:  # collected, reported together below
            failures.append(f"{operation.label}: {error}")
    print(f"{caller}: {sent} cases in {time.monotonic() - started:.1f} s")
    assert not failures, "\n\n".join(failures)
