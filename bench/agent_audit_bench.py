"""Audit trail throughput, verification speed and memory, against baselines
measured in the same run.

    uv run python bench/agent_audit_bench.py [--quick] [--entries N]

Figures (``figure=value unit``):

- durable appends/s of OfflineAuditTrail with 1 and with 16 concurrent
  producers (every append returns only after its commit and checkpoint);
- baseline (a), the prototype's appender: per entry a new sqlite3
  connection, ``json.dumps``, one Ed25519 signature, one insert, one commit;
- baseline (b), an ideal loop: canonical JSON + SHA-256 + insert, one
  signature and one commit per 1,000 entries, no concurrency, no checks;
- ``verify()`` of a log of ``--entries`` entries appended in commits of 100;
- peak RSS of a process that opens that log, verifies it and appends to it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from msp_agent.audit import Built, OfflineAuditTrail
from msp_agent.keys import DelegatedSigningKey
from msp_protocol.canonical import canonicalize
from msp_protocol.delegation import Scope, issue_delegation
from msp_protocol.keys import SigningKey
from msp_protocol.merkle import TreeState

CENTRAL = SigningKey(b"\x01" * 32)
NOW = datetime.now(UTC)


def entry_data(n: int) -> dict[str, object]:
    return {"action": "restart-timesyncd", "runbook": "ntp-sync", "result": "ok", "attempt": n}


def enrolled(key_dir: Path) -> DelegatedSigningKey:
    signer = DelegatedSigningKey.load_or_create(key_dir, central_keys=[CENTRAL.verify_key])
    signer.install_certificate(
        issue_delegation(
            CENTRAL,
            subject=signer.verify_key,
            appliance_id="bench-1",
            site_id="site-1",
            scopes=[Scope.AUDIT, Scope.EVIDENCE],
            not_before=NOW - timedelta(minutes=1),
        )
    )
    return signer


async def open_trail(directory: Path, signer: DelegatedSigningKey) -> OfflineAuditTrail:
    return await OfflineAuditTrail.open(
        directory / "audit.sqlite",
        appliance_id="bench-1",
        signer=signer,
        central_keys=[CENTRAL.verify_key],
        row_key=signer.audit_row_key(),
    )


async def ours(directory: Path, producers: int, total: int) -> float:
    signer = enrolled(directory / "keys")
    trail = await open_trail(directory, signer)
    per_producer = total // producers

    async def produce(p: int) -> None:
        for n in range(per_producer):
            await trail.append("l1.action", f"producer-{p}", entry_data(n))

    started = time.perf_counter()
    await asyncio.gather(*(produce(p) for p in range(producers)))
    elapsed = time.perf_counter() - started
    await trail.close()
    return per_producer * producers / elapsed


def prototype(directory: Path, total: int) -> float:
    """The first product's appender: everything per entry."""
    key = SigningKey(b"\x05" * 32)
    path = directory / "prototype.sqlite"
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE audit (id INTEGER PRIMARY KEY, entry TEXT, signature BLOB)")
    setup.commit()
    setup.close()
    started = time.perf_counter()
    for n in range(total):
        connection = sqlite3.connect(path)
        text = json.dumps(
            {"ts": datetime.now(UTC).isoformat(), "data": entry_data(n)}, sort_keys=True
        )
        connection.execute(
            "INSERT INTO audit (entry, signature) VALUES (?, ?)", (text, key.sign(text.encode()))
        )
        connection.commit()
        connection.close()
    return total / (time.perf_counter() - started)


def ideal(directory: Path, total: int, batch: int = 1_000) -> float:
    """The floor of the work: canonical bytes, a hash, an insert; one
    signature and one durable commit per 1,000 entries."""
    key = SigningKey(b"\x06" * 32)
    connection = sqlite3.connect(directory / "ideal.sqlite", isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("CREATE TABLE entries (idx INTEGER PRIMARY KEY, raw BLOB, leaf BLOB)")
    connection.execute("CREATE TABLE checkpoints (size INTEGER PRIMARY KEY, sig BLOB)")
    started = time.perf_counter()
    ts = NOW.isoformat()
    for start in range(0, total, batch):
        rows = []
        for index in range(start, min(total, start + batch)):
            raw = canonicalize(
                {
                    "index": index,
                    "ts": ts,
                    "kind": "l1.action",
                    "actor": "a",
                    "data": entry_data(index),
                }
            )
            rows.append((index, raw, hashlib.sha256(b"\x00" + raw).digest()))
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany("INSERT INTO entries VALUES (?, ?, ?)", rows)
        connection.execute(
            "INSERT INTO checkpoints VALUES (?, ?)", (start + len(rows), key.sign(rows[-1][2]))
        )
        connection.execute("COMMIT")
    connection.close()
    return total / (time.perf_counter() - started)


async def build_log(directory: Path, entries: int, commit: int = 100) -> None:
    signer = enrolled(directory / "keys")
    trail = await open_trail(directory, signer)
    remaining = entries - trail.size
    while remaining > 0:
        count = min(commit, remaining)
        batch = [("l1.action", "agent", entry_data(n)) for n in range(count)]
        await trail.append_built(lambda _c, _i, _t, b=batch: Built(b))  # type: ignore[misc]
        remaining -= count
    await trail.close()


def report(name: str, value: float, unit: str) -> None:
    print(f"{name}={value:.2f} {unit}" if unit == "ratio" else f"{name}={value:.0f} {unit}")


def bare_replay(connection: sqlite3.Connection) -> float:
    """The least a verifier must do: read every entry, hash it, rebuild the
    tree. Entries per second."""
    state = TreeState()
    started = time.perf_counter()
    count = 0
    cursor = connection.execute("SELECT raw FROM entries ORDER BY idx")
    while rows := cursor.fetchmany(10_000):
        for (raw,) in rows:
            state.append(hashlib.sha256(b"\x00" + raw).digest())
        count += len(rows)
    return count / (time.perf_counter() - started)


def holder(directory: Path) -> None:
    """Run in a child: open the log, verify it, append, print what it took."""

    async def hold() -> None:
        signer = DelegatedSigningKey.load_or_create(
            directory / "keys", central_keys=[CENTRAL.verify_key]
        )
        trail = await open_trail(directory, signer)
        baseline = await trail.store.run(bare_replay)
        started = time.perf_counter()
        result = await trail.verify()
        elapsed = time.perf_counter() - started
        assert result.ok, result.describe()
        for n in range(100):
            await trail.append("l1.action", "agent", entry_data(n))
        size = trail.size
        await trail.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            json.dumps(
                {
                    "entries": result.size,
                    "verify_seconds": elapsed,
                    "bare_replay_per_second": baseline,
                    "size": size,
                    "peak_mb": peak,
                }
            )
        )

    asyncio.run(hold())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument(
        "--entries", type=int, default=1_000_000, help="entries in the verify/RSS log"
    )
    parser.add_argument("--hold", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold:
        holder(args.hold)
        return
    appends = 400 if args.quick else 8_000
    entries = min(args.entries, 5_000) if args.quick else args.entries
    with tempfile.TemporaryDirectory(prefix="msp-bench-") as scratch:
        base = Path(scratch)
        for name in ("one", "sixteen", "proto", "ideal", "log"):
            (base / name).mkdir()
        baseline_a = prototype(base / "proto", max(200, appends // 8))
        baseline_b = ideal(base / "ideal", appends * 4)
        one = asyncio.run(ours(base / "one", 1, max(200, appends // 4)))
        sixteen = asyncio.run(ours(base / "sixteen", 16, appends))
        report("prototype_appends", baseline_a, "entries/s")
        report("ideal_loop_appends", baseline_b, "entries/s")
        report("audit_appends_1_producer", one, "entries/s")
        report("audit_appends_16_producers", sixteen, "entries/s")
        report("audit_16_vs_prototype", sixteen / baseline_a, "ratio")
        report("audit_16_vs_ideal", sixteen / baseline_b, "ratio")
        report("audit_1_vs_prototype", one / baseline_a, "ratio")

        started = time.perf_counter()
        asyncio.run(build_log(base / "log", entries))
        report("build_log_commits_of_100", entries / (time.perf_counter() - started), "entries/s")
        held = subprocess.run(
            [sys.executable, __file__, "--hold", str(base / "log")],
            capture_output=True,
            text=True,
            check=True,
        )
        figures = json.loads(held.stdout.strip().splitlines()[-1])
        report("verify_entries", figures["entries"], "entries")
        verify_rate = figures["entries"] / figures["verify_seconds"]
        report("verify_rate", verify_rate, "entries/s")
        report("bare_replay_rate", figures["bare_replay_per_second"], "entries/s")
        report("verify_vs_bare_replay", verify_rate / figures["bare_replay_per_second"], "ratio")
        report("peak_rss_holding_log", figures["peak_mb"], "MB")


if __name__ == "__main__":
    main()
