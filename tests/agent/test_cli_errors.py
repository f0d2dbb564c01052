"""``msp-agent``'s failures: one line on stderr, exit status 1 (cannot be
done, does not verify) or 2 (usage), never a traceback. Each case runs the
CLI as a subprocess, except the unreadable state directory (the tests run as
root, who reads everything), which patches the file system in-process."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from msp_agent import cli as agent_cli
from msp_agent.audit import OfflineAuditTrail
from msp_agent.keys import DelegatedSigningKey
from msp_protocol.encoding import utc_now
from msp_protocol.keys import SigningKey
from tests.agent.support import APPLIANCE, enrolled_key
from tests.agent.support import CENTRAL as TRAIL_ROOT

CENTRAL = SigningKey(b"\x07" * 32).verify_key.hex
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens


def cli(*argv: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "msp_agent", *argv],
        capture_output=True,
        text=True,
        input=stdin if stdin is not None else "",
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )


def fails(result: subprocess.CompletedProcess[str], status: int, *messages: str) -> None:
    assert result.returncode == status, result.stderr
    for message in messages:
        assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def config_file(tmp_path: Path, central: str = CENTRAL, **settings: str) -> Path:
    path = tmp_path / "agent.json"
    path.write_text(
        json.dumps(
            {"central_public_key": central, "state_dir": str(tmp_path / "state"), **settings}
        )
    )
    return path


def audit_trail(state: Path) -> None:
    """An enrolled appliance's audit trail of a few entries, under TRAIL_ROOT."""

    async def build() -> None:
        signer = enrolled_key(state / "keys", clock=utc_now)
        trail = await OfflineAuditTrail.open(
            state / "audit.sqlite",
            appliance_id=APPLIANCE,
            signer=signer,
            central_keys=[TRAIL_ROOT.verify_key],
            row_key=signer.audit_row_key(),
        )
        try:
            for n in range(3):
                await trail.append("check.result", "runbook:time-sync", {"ok": True, "n": n})
        finally:
            await trail.close()

    asyncio.run(build())


# --- 1. audit export ------------------------------------------------------------------------


def test_export_to_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    audit_trail(tmp_path / "state")
    config = config_file(tmp_path, TRAIL_ROOT.verify_key.hex)
    out = tmp_path / "missing" / "out.json"
    fails(
        cli("--config", str(config), "audit", "export", str(out)),
        1,
        f"cannot write {out}: No such file or directory",
    )
    fails(
        cli("--config", str(config), "audit", "export", str(tmp_path)),
        1,
        f"cannot write {tmp_path}: it is a directory",
    )
    written = cli("--config", str(config), "audit", "export", str(tmp_path / "out.json"))
    assert written.returncode == 0, written.stderr
    assert "exported 4 entries" in written.stdout


def test_export_of_a_damaged_envelope_is_one_line(tmp_path: Path) -> None:
    audit_trail(tmp_path / "state")
    with sqlite3.connect(tmp_path / "state" / "audit.sqlite") as database:
        (size,) = database.execute("SELECT max(size) FROM checkpoints").fetchone()
        database.execute("UPDATE checkpoints SET envelope = x'7b7d' WHERE size = ?", (size,))
    database.close()
    config = config_file(tmp_path, TRAIL_ROOT.verify_key.hex)
    out = tmp_path / "out.json"
    fails(
        cli("--config", str(config), "audit", "export", str(out)),
        1,
        f"the audit trail is damaged, not exported: checkpoint {size}: ",
    )
    assert not out.exists()


def test_a_tampered_trail_is_exported_and_fails_verification(tmp_path: Path) -> None:
    """What does not verify is exactly what an auditor must see: written,
    and the command (like msp-verify on the file) says it does not verify."""
    audit_trail(tmp_path / "state")
    with sqlite3.connect(tmp_path / "state" / "audit.sqlite") as database:
        (raw,) = database.execute("SELECT raw FROM entries WHERE idx = 2").fetchone()
        database.execute(
            "UPDATE entries SET raw = ? WHERE idx = 2", (bytes(raw).replace(b'"n":1', b'"n":7'),)
        )
    database.close()
    config = config_file(tmp_path, TRAIL_ROOT.verify_key.hex)
    out = tmp_path / "out.json"
    fails(cli("--config", str(config), "audit", "export", str(out)), 1, "but it does NOT verify")
    assert out.exists()
    verdict = subprocess.run(
        [
            sys.executable,
            "-m",
            "msp_protocol.verify_cli",
            "--central-key",
            TRAIL_ROOT.verify_key.hex,
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verdict.returncode == 1, verdict.stdout + verdict.stderr


# --- 2. a damaged stored certificate ----------------------------------------------------------


def test_a_damaged_certificate_is_one_line(tmp_path: Path) -> None:
    DelegatedSigningKey.load_or_create(
        tmp_path / "state" / "keys", central_keys=[SigningKey(b"\x07" * 32).verify_key]
    )
    certificate = tmp_path / "state" / "keys" / "certificate.json"
    certificate.write_text('{"payloadType": "damaged"}')
    certificate.chmod(0o600)
    config = config_file(tmp_path, central_url=UNREACHABLE)
    for argv in (["enroll", "--token", "t"], ["run"]):
        fails(
            cli("--config", str(config), *argv),
            1,
            f"the stored certificate {certificate} is unusable",
            "re-enroll the appliance",
        )


# --- 3. log level -----------------------------------------------------------------------------


def test_an_unknown_log_level_is_a_usage_error(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    fails(
        cli("--config", str(config), "status", MSP_AGENT_LOG_LEVEL="verbose"),
        2,
        "invalid setting log_level: Input should be 'debug', 'info'",
    )
    (tmp_path / "state").mkdir(exist_ok=True)
    accepted = cli("--config", str(config), "status", MSP_AGENT_LOG_LEVEL="DEBUG")
    # Accepted: the answer is about the agent (not enrolled), not the setting.
    assert (accepted.returncode, accepted.stderr) == (1, ""), accepted.stderr
    assert "not enrolled" in accepted.stdout


# --- 4. a state directory this user cannot read -------------------------------------------------


def deny(monkeypatch: pytest.MonkeyPatch, *denied: Path) -> None:
    """Path.read_text and Path.stat raise PermissionError below ``denied``."""
    read_text, stat = Path.read_text, Path.stat

    def check(path: Path) -> None:
        if any(path.is_relative_to(d) for d in denied):
            raise PermissionError(13, "Permission denied", str(path))

    def denied_read_text(self: Path, *args: object, **kwargs: object) -> str:
        check(self)
        return read_text(self, *args, **kwargs)  # type: ignore[arg-type]

    def denied_stat(self: Path, *args: object, **kwargs: object) -> os.stat_result:
        check(self)
        return stat(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", denied_read_text)
    monkeypatch.setattr(Path, "stat", denied_stat)


def test_an_unreadable_state_directory_is_not_not_enrolled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    (state / "keys").mkdir(parents=True)
    (state / "keys" / "certificate.json").write_text("{}")
    config = config_file(tmp_path)
    deny(monkeypatch, state)
    cases = [
        (["status"], f"cannot read {state / 'status.json'}: permission denied"),
        (["audit", "verify"], f"cannot read {state}: permission denied"),
    ]
    for argv, message in cases:
        assert agent_cli.main(["--config", str(config), *argv]) == 1
        captured = capsys.readouterr()
        assert message in captured.err
        assert "run as the agent's user or root" in captured.err
        assert len(captured.err.strip().splitlines()) == 1, captured.err
        assert "not enrolled" not in captured.out + captured.err

    # status.json absent (the agent is not running), the key directory unreadable
    monkeypatch.undo()
    deny(monkeypatch, state / "keys")
    assert agent_cli.main(["--config", str(config), "status"]) == 1
    captured = capsys.readouterr()
    assert f"cannot read {state / 'keys'}: permission denied" in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert "not enrolled" not in captured.out


# --- 5. key files of another user ---------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_key_files_of_another_user_are_not_chowned(tmp_path: Path) -> None:
    state = tmp_path / "state"
    audit_trail(state)
    service_uid = 4242  # the agent's user (msp on NixOS); no name in /etc/passwd here
    for path in [state, *state.rglob("*")]:
        os.chown(path, service_uid, service_uid)
    config = config_file(tmp_path, TRAIL_ROOT.verify_key.hex)
    result = cli("--config", str(config), "audit", "verify")
    fails(
        result,
        1,
        f"run this command as uid {service_uid}, the owner of {state}",
        "do not chown",
    )
    assert "fix: chown" not in result.stderr


# --- 6. the token stays out of ps ----------------------------------------------------------------


def test_the_token_can_come_from_stdin(tmp_path: Path) -> None:
    config = config_file(tmp_path, central_url=UNREACHABLE)
    fails(
        cli("--config", str(config), "enroll", "--token-file", "-", stdin=""),
        2,
        "no enrollment token: stdin is empty",
    )
    # With a token on stdin, enrollment gets as far as the (absent) server.
    fails(
        cli("--config", str(config), "enroll", "--token-file", "-", stdin="one-time-token\n"),
        1,
        "central server unavailable",
    )
    usage = cli("--config", str(config), "enroll", "--help")
    assert "prefer --token-file" in " ".join(usage.stdout.split())
