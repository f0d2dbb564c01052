"""SMSAlerter against a local fake of Twilio's Messages API."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from msp_agent.sms import SMSAlerter, TwilioSettings, reference
from tests.agent.fake_twilio import VALID_FROM, FakeTwilio
from tests.agent.support import Clock

ON_CALL = ("+15551230001", "+15551230002")


@pytest.fixture
async def twilio() -> AsyncIterator[tuple[FakeTwilio, str]]:
    fake = FakeTwilio()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield fake, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def settings(tmp_path: Path, fake: FakeTwilio, url: str, **changes: object) -> TwilioSettings:
    secret = tmp_path / "twilio-secret"
    if not secret.exists():
        secret.write_text(fake.auth_token + "\n")
        secret.chmod(0o600)
    options: dict[str, object] = {
        "account_sid": fake.account_sid,
        "secret_file": secret,
        "from_number": VALID_FROM,
        "base_url": url,
        "timeout_seconds": 1.0,
        **changes,
    }
    return TwilioSettings(**options)  # type: ignore[arg-type]


async def alerter(
    tmp_path: Path,
    twilio: tuple[FakeTwilio, str],
    session: aiohttp.ClientSession,
    recipients: tuple[str, ...] = ON_CALL,
    **kwargs: object,
) -> SMSAlerter:
    fake, url = twilio
    options: dict[str, object] = {"retry_base": 0.01, "clock": Clock(), **kwargs}
    return await SMSAlerter.open(
        tmp_path / "sms.sqlite",
        settings(tmp_path, fake, url),
        recipients,
        session,
        **options,  # type: ignore[arg-type]
    )


async def test_texts_each_on_call_number_once(
    tmp_path: Path, twilio: tuple[FakeTwilio, str], session: aiohttp.ClientSession
) -> None:
    fake, _ = twilio
    sms = await alerter(tmp_path, twilio, session)
    try:
        outcome = await sms.alert("inc-1", "CRITICAL clinic-1: backups failing, cloud unreachable")
        assert outcome.results == dict.fromkeys(ON_CALL, "sent")
        assert [m["to"] for m in fake.messages] == list(ON_CALL)
        post = fake.received[0]
        assert post.authorized
        assert post.form["From"] == VALID_FROM
        assert post.form["Body"].endswith(reference("inc-1"))
        again = await sms.alert("inc-1", "CRITICAL clinic-1: backups failing, cloud unreachable")
        assert again.settled
        assert len(fake.messages) == 2, "never a second text for the same incident"
        assert len(fake.received) == 2
    finally:
        await sms.close()


@pytest.mark.parametrize(
    ("number", "code"),
    [
        pytest.param("+15005550001", "21211", id="invalid_to"),
        pytest.param("+15005550002", "21612", id="unroutable"),
        pytest.param("+15005550003", "21408", id="no_permission"),
        pytest.param("+15005550004", "21610", id="blocked"),
        pytest.param("+15005550009", "21614", id="not_sms_capable"),
    ],
)
async def test_permanent_errors_are_recorded_and_never_retried(
    tmp_path: Path,
    twilio: tuple[FakeTwilio, str],
    session: aiohttp.ClientSession,
    number: str,
    code: str,
) -> None:
    fake, _ = twilio
    sms = await alerter(tmp_path, twilio, session, recipients=(number, ON_CALL[0]))
    try:
        outcome = await sms.alert("inc-2", "disk full")
        assert outcome.results[number].startswith(f"failed: {code}")
        assert outcome.results[ON_CALL[0]] == "sent"
        await sms.alert("inc-2", "disk full")
        assert [r.form["To"] for r in fake.received].count(number) == 1
    finally:
        await sms.close()


async def test_invalid_from_is_permanent(
    tmp_path: Path, twilio: tuple[FakeTwilio, str], session: aiohttp.ClientSession
) -> None:
    fake, url = twilio
    sms = await SMSAlerter.open(
        tmp_path / "sms.sqlite",
        settings(tmp_path, fake, url, from_number="+15005550001"),
        ON_CALL[:1],
        session,
    )
    try:
        assert (await sms.alert("inc-3", "x")).results[ON_CALL[0]].startswith("failed: 21212")
    finally:
        await sms.close()


async def test_too_long_body_is_cut_to_twilios_limit(
    tmp_path: Path, twilio: tuple[FakeTwilio, str], session: aiohttp.ClientSession
) -> None:
    fake, _ = twilio
    sms = await alerter(tmp_path, twilio, session, recipients=ON_CALL[:1])
    try:
        assert (await sms.alert("inc-4", "x" * 5000)).settled
        assert len(fake.messages[0]["body"]) == 1600
        assert fake.messages[0]["body"].endswith(reference("inc-4"))
    finally:
        await sms.close()


async def test_429_is_retried_with_backoff(
    tmp_path: Path, twilio: tuple[FakeTwilio, str], session: aiohttp.ClientSession
) -> None:
    fake, _ = twilio
    fake.inject("429", "429")
    sms = await alerter(tmp_path, twilio, session, recipients=ON_CALL[:1])
    try:
        assert (await sms.alert("inc-5", "x")).results == {ON_CALL[0]: "sent"}
        assert len(fake.received) == 3
        assert len(fake.messages) == 1
    finally:
        await sms.close()


async def test_connection_refused_is_retried_then_left_pending(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    fake = FakeTwilio()
    closed_port = "http://127.0.0.1:9"  # discard port: nothing listens
    sms = await SMSAlerter.open(
        tmp_path / "sms.sqlite",
        settings(tmp_path, fake, closed_port),
        ON_CALL[:1],
        session,
        retries=2,
        retry_base=0.01,
    )
    try:
        outcome = await sms.alert("inc-6", "x")
        assert outcome.results[ON_CALL[0]].startswith("pending: cannot connect to Twilio")
        assert (await sms.texts())[0]["state"] == "intent"
        assert (await sms.texts())[0]["attempts"] == 3
    finally:
        await sms.close()


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param("accept_then_500", id="5xx_after_accepting"),
        pytest.param("accept_then_drop", id="cut_after_accepting"),
        pytest.param("accept_then_hang", id="timeout_after_accepting"),
    ],
)
async def test_ambiguous_outcome_is_reconciled_not_resent(
    tmp_path: Path, twilio: tuple[FakeTwilio, str], session: aiohttp.ClientSession, fault: str
) -> None:
    fake, _ = twilio
    fake.inject(fault)
    sms = await alerter(tmp_path, twilio, session, recipients=ON_CALL[:1])
    try:
        first = await sms.alert("inc-7", "x")
        assert first.results[ON_CALL[0]].startswith("pending:")
        assert (await sms.texts())[0]["state"] == "ambiguous"
        assert len(fake.messages) == 1, "Twilio did queue it"
        second = await sms.alert("inc-7", "x")
        assert second.results == {ON_CALL[0]: "sent"}
        assert len(fake.messages) == 1, "and it was found, not sent again"
        assert [r.method for r in fake.received] == ["POST", "GET"]
        texts = await sms.texts()
        assert texts[0]["sid"] == fake.messages[0]["sid"]
    finally:
        await sms.close()


async def test_5xx_without_accepting_is_looked_up_then_sent_once(
    tmp_path: Path, twilio: tuple[FakeTwilio, str], session: aiohttp.ClientSession
) -> None:
    fake, _ = twilio
    fake.inject("503")
    sms = await alerter(tmp_path, twilio, session, recipients=ON_CALL[:1])
    try:
        assert not (await sms.alert("inc-8", "x")).settled
        assert (await sms.alert("inc-8", "x")).settled
        assert len(fake.messages) == 1
        assert [r.method for r in fake.received] == ["POST", "GET", "POST"]
    finally:
        await sms.close()


async def test_lookup_failure_never_resends_blindly(
    tmp_path: Path, twilio: tuple[FakeTwilio, str], session: aiohttp.ClientSession
) -> None:
    fake, _ = twilio
    fake.inject("accept_then_500", "503")
    sms = await alerter(tmp_path, twilio, session, recipients=ON_CALL[:1])
    try:
        await sms.alert("inc-9", "x")
        outcome = await sms.alert("inc-9", "x")  # the lookup fails: nothing is sent
        assert outcome.results[ON_CALL[0]].startswith("pending: cannot look up earlier texts")
        assert len(fake.messages) == 1
        assert (await sms.alert("inc-9", "x")).settled
        assert len(fake.messages) == 1
    finally:
        await sms.close()


async def test_bad_credentials_hold_texts_without_failing_them(
    tmp_path: Path,
    twilio: tuple[FakeTwilio, str],
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake, _ = twilio
    sms = await alerter(tmp_path, twilio, session, recipients=ON_CALL[:1])
    secret = tmp_path / "twilio-secret"
    secret.write_text("wrong-secret-value\n")
    try:
        outcome = await sms.alert("inc-10", "x")
        assert "credentials" in outcome.results[ON_CALL[0]]
        assert "wrong-secret-value" not in caplog.text
        assert "wrong-secret-value" not in str(outcome)
        secret.write_text(fake.auth_token)  # the operator fixes the credential file
        assert (await sms.alert("inc-10", "x")).settled
        assert len(fake.messages) == 1
    finally:
        await sms.close()


async def test_per_hour_cap_holds_further_texts(
    tmp_path: Path, twilio: tuple[FakeTwilio, str], session: aiohttp.ClientSession
) -> None:
    fake, _ = twilio
    clock = Clock()
    sms = await alerter(tmp_path, twilio, session, recipients=ON_CALL[:1], per_hour=2, clock=clock)
    try:
        outcomes = [await sms.alert(f"flap-{n}", "link flapping") for n in range(5)]
        assert [o.settled for o in outcomes] == [True, True, False, False, False]
        assert "pending: 2 texts in the last hour" in outcomes[2].results[ON_CALL[0]]
        assert len(fake.messages) == 2
        clock.advance(timedelta(minutes=61))
        assert (await sms.alert("flap-2", "link flapping")).settled
        assert len(fake.messages) == 3
    finally:
        await sms.close()


async def test_slow_answer_within_the_timeout_is_fine(
    tmp_path: Path, twilio: tuple[FakeTwilio, str], session: aiohttp.ClientSession
) -> None:
    fake, _ = twilio
    fake.inject("slow")
    sms = await alerter(tmp_path, twilio, session, recipients=ON_CALL[:1])
    try:
        assert (await sms.alert("inc-11", "x")).settled
    finally:
        await sms.close()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import aiohttp
    from msp_agent.sms import SMSAlerter, TwilioSettings

    async def main():
        async with aiohttp.ClientSession() as session:
            settings = TwilioSettings(account_sid=sys.argv[2], secret_file=Path(sys.argv[3]),
                                      from_number="+15005550006", base_url=sys.argv[4], timeout_seconds=600)
            sms = await SMSAlerter.open(Path(sys.argv[1]), settings, ["+15551230001"], session)
            await sms.alert("inc-crash", "critical: cloud unreachable")

    asyncio.run(main())
    """
)


async def test_kill_9_between_intent_and_answer_never_sends_twice(
    tmp_path: Path, twilio: tuple[FakeTwilio, str], session: aiohttp.ClientSession
) -> None:
    fake, url = twilio
    config = settings(tmp_path, fake, url)
    fake.inject("accept_then_hang")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path / "sms.sqlite"),
            fake.account_sid,
            str(config.secret_file),
            url,
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        for _ in range(300):
            if fake.messages:
                break
            await asyncio.sleep(0.05)
        assert fake.messages, "the child never reached Twilio"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    sms = await SMSAlerter.open(tmp_path / "sms.sqlite", config, ["+15551230001"], session)
    try:
        assert (await sms.texts())[0]["state"] == "posting"
        assert (await sms.alert("inc-crash", "critical: cloud unreachable")).settled
        assert len(fake.messages) == 1
    finally:
        await sms.close()
