"""OfflineAuditTrail: the appliance's RFC 6962 Merkle audit log, in SQLite.

Every L1 action, evidence signature, escalation, key rotation and quota event
is an entry ``{index, ts, kind, actor, data}`` stored as its exact canonical
bytes. Appends from any number of tasks are *group-committed* by one writer:
it takes everything pending (at most :data:`MAX_COMMIT_ENTRIES`), gives the
entries consecutive indices, signs one checkpoint for the new tree and commits
entries and checkpoint in one transaction (WAL, ``synchronous=FULL``).
``append`` returns only after that commit, so an acknowledged entry is on disk
and covered by a signature.

Storage, in the one file this trail owns (evidence bundles live beside the
entries so a bundle and the entry recording it commit together):

- ``entries(idx, raw, leaf, mac)``: canonical bytes, leaf hash and the row
  authentication code (:func:`row_mac`);
- ``nodes(level, position, hash)``: roots of perfect subtrees of 256 leaves
  and more, so proofs and roots at any size cost O(log n) lookups;
- ``checkpoints``: the latest checkpoint, one per 1,024 entries before it
  (they bound where verification looks for a bad entry), and those sent for
  sync; each with the compact range of the tree at its size;
- ``receipts``: the central server's cosignatures;
- ``certificates``: every certificate whose key signed a checkpoint.

The audit trail never drops an entry. With a disk quota it raises alerts at
80 % and 95 %; when full, ``append`` fails loudly
(:class:`AuditTrailFullError`), the refusals are counted, and the gap is
recorded as an entry as soon as appends fit again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from msp_agent.central import CentralClient, CentralRejected, CentralUnavailable
from msp_agent.pacing import BatchSizer
from msp_agent.store import Quarantine, SQLiteStore, quarantine_file
from msp_protocol.delegation import VerifiedDelegation, check_delegation
from msp_protocol.dsse import Envelope, parse_envelope
from msp_protocol.encoding import format_time, to_hex, utc_now
from msp_protocol.errors import ProtocolError
from msp_protocol.keys import SigningKey, VerifyKey
from msp_protocol.log import (
    GENESIS_KIND,
    EntryRecord,
    check_checkpoint,
    check_receipt,
    genesis_entry,
    make_checkpoint,
    make_entry,
    parse_entry,
)
from msp_protocol.merkle import (
    EMPTY_ROOT,
    TreeState,
    consistency_proof,
    inclusion_proof,
    node_hash,
    root_of,
)
from msp_protocol.sync import MAX_BATCH_ENTRIES, SyncRequest

log = logging.getLogger(__name__)

MAX_COMMIT_ENTRIES = 1_000
# Entries per sync request: the witness refuses larger batches.
MAX_SYNC_ENTRIES = MAX_BATCH_ENTRIES
# Perfect subtrees of at least this many leaves are stored: a proof reads at
# most two partial blocks of leaves below it and O(log n) stored nodes.
NODE_MIN_LEVEL = 8
NODE_WIDTH = 1 << NODE_MIN_LEVEL
# One checkpoint is kept per this many entries (plus the latest and those
# sent to the server): verification pins a bad entry to such a block.
CHECKPOINT_SPACING = 1_024
QUOTA_ALERT_LEVELS = (0.80, 0.95)
# Rough per-row cost beyond the entry bytes (key, leaf hash, b-tree overhead):
# used to refuse a commit that would cross the quota before writing it.
ROW_OVERHEAD = 64

MIGRATIONS = [
    """
    CREATE TABLE entries (
        idx INTEGER PRIMARY KEY,
        raw BLOB NOT NULL,
        leaf BLOB NOT NULL,
        mac BLOB NOT NULL
    );
    CREATE TABLE nodes (
        level INTEGER NOT NULL,
        position INTEGER NOT NULL,
        hash BLOB NOT NULL,
        PRIMARY KEY (level, position)
    ) WITHOUT ROWID;
    CREATE TABLE checkpoints (
        size INTEGER PRIMARY KEY,
        envelope BLOB NOT NULL,
        nodes BLOB NOT NULL,
        key_id TEXT NOT NULL,
        for_sync INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE receipts (
        size INTEGER PRIMARY KEY,
        envelope BLOB NOT NULL,
        received_at TEXT NOT NULL
    );
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        envelope BLOB NOT NULL
    );
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE evidence (
        bundle_id TEXT PRIMARY KEY,
        log_index INTEGER NOT NULL UNIQUE,
        check_id TEXT NOT NULL,
        envelope BLOB NOT NULL,
        created_at TEXT NOT NULL,
        rejected TEXT
    );
    """,
    # Bundles the central server acknowledged are kept for the audit export,
    # marked delivered, instead of deleted.
    """
    ALTER TABLE evidence ADD COLUMN delivered_at TEXT;
    CREATE INDEX evidence_waiting ON evidence (log_index)
        WHERE delivered_at IS NULL AND rejected IS NULL;
    """,
]


class AuditTrailError(Exception):
    pass


class AuditTrailFullError(AuditTrailError):
    """The disk quota is reached: the entry was NOT recorded."""


class AuditTrailClosedError(AuditTrailError):
    pass


class AuditSyncRejected(AuditTrailError):
    """The central server refused this log's history (rewrite, fork,
    truncation, bad proof): report it; do not retry the same batch."""

    def __init__(self, rejection: CentralRejected) -> None:
        super().__init__(f"the central server refused the audit history: {rejection}")
        self.rejection = rejection


class LocalTruncationError(AuditTrailError):
    """The central server witnessed more of this log than is stored here."""


@dataclass(frozen=True, slots=True)
class SyncReport:
    from_size: int
    to_size: int
    batches: int


class Signer(Protocol):
    """What the trail needs of the device key (a DelegatedSigningKey)."""

    def signing_key(self) -> SigningKey: ...

    @property
    def certificate(self) -> VerifiedDelegation | None: ...


class Built(NamedTuple):
    """What an entry builder produces, in the writer's thread, once it knows
    the index its first entry gets."""

    entries: list[tuple[str, str, dict[str, Any]]]  # (kind, actor, data)
    # Extra writes committed in the same transaction as the entries.
    side_write: Callable[[sqlite3.Connection], None] | None = None
    # Handed back to the caller of append_built.
    result: Any = None


Builder = Callable[[sqlite3.Connection, int, datetime], Built]


@dataclass(frozen=True, slots=True)
class Appended:
    indices: tuple[int, ...]
    size: int  # the size of the checkpoint covering them
    result: Any = None

    @property
    def index(self) -> int:
        """The index of the (last) entry appended; -1 if the builder added none."""
        return self.indices[-1] if self.indices else -1


@dataclass(frozen=True, slots=True)
class Head:
    size: int
    root: bytes
    checkpoint: Envelope | None
    receipt_size: int  # the largest size the central server has cosigned


@dataclass(frozen=True, slots=True)
class AuditVerification:
    """The outcome of :meth:`OfflineAuditTrail.verify`."""

    size: int
    checkpoints: int
    receipts: int
    first_bad_index: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        if self.ok:
            return (
                f"ok: {self.size} entries, {self.checkpoints} checkpoints, {self.receipts} receipts"
            )
        where = f"entry {self.first_bad_index}: " if self.first_bad_index is not None else ""
        return f"{where}{self.problem}"


@dataclass(slots=True)
class _Pending:
    builder: Builder
    future: asyncio.Future[Appended]


@dataclass(slots=True)
class _Quota:
    limit: int | None
    alerted: float = 0.0
    refused: int = 0
    refused_since: str | None = None


@dataclass(slots=True)
class _Commit:
    """What the writer thread hands back after a successful commit."""

    state: TreeState
    results: list[Appended | BaseException] = field(default_factory=list)
    used_bytes: int = 0
    alerts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    recorded_serial: str | None = None
    head_checkpoint: tuple[int, bool] | None = None


AlertHook = Callable[[str, dict[str, Any]], None]


class OfflineAuditTrail:
    """The appliance's audit log. Create with :meth:`open`."""

    def __init__(
        self,
        store: SQLiteStore,
        state: TreeState,
        *,
        appliance_id: str,
        signer: Signer,
        central_keys: Sequence[VerifyKey],
        row_key: bytes,
        clock: Callable[[], datetime],
        quota: _Quota,
        on_alert: AlertHook | None,
    ) -> None:
        self._store = store
        self._row_key = row_key
        self._state = state
        self.appliance_id = appliance_id
        self._signer = signer
        self._central_keys = list(central_keys)
        self._clock = clock
        self._quota = quota
        self._on_alert = on_alert
        self._queue: list[_Pending] = []
        self._recorded_serial: str | None = None
        # (size, made for sync) of the checkpoint at the head; None: look it up.
        # Read and written only in the store's thread.
        self._head_checkpoint: tuple[int, bool] | None = None
        # The largest batch sent whose fate is unknown (no answer, or an
        # answer that does not say it was not acted on): the server may have
        # witnessed it. None: look it up (after a start, every batch sent
        # without a receipt counts).
        self._maybe_witnessed: int | None = None
        self._wakeup = asyncio.Event()
        self._closing = False
        self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")
        self.quarantine: Quarantine | None = None

    # --- lifecycle ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        appliance_id: str,
        signer: Signer,
        central_keys: Sequence[VerifyKey],
        row_key: bytes,
        clock: Callable[[], datetime] = utc_now,
        quota_bytes: int | None = None,
        on_alert: AlertHook | None = None,
    ) -> OfflineAuditTrail:
        """Open the log at ``path`` (creating it with its genesis entry).

        ``row_key`` is the secret for row authentication codes (see
        :func:`row_mac`); it lives in the key directory, not in the database.

        A database that fails its integrity check is quarantined and a new log
        begun; the new log's second entry records the quarantine, and
        :attr:`quarantine` describes it.
        """
        store, quarantine = await SQLiteStore.open(path, MIGRATIONS, name="audit")
        keys = list(central_keys)
        try:
            state, quota = await store.run(lambda c: _load_state(c, quota_bytes, keys))
        except AuditTrailError as damaged:
            # Readable by SQLite but not a consistent log (rows removed or
            # changed behind the agent's back): keep it aside, begin anew.
            await store.close()
            quarantine = quarantine_file(path, str(damaged))
            store, _ = await SQLiteStore.open(path, MIGRATIONS, name="audit")
            state, quota = await store.run(lambda c: _load_state(c, quota_bytes, keys))
        except BaseException:
            await store.close()
            raise
        trail = cls(
            store,
            state,
            appliance_id=appliance_id,
            signer=signer,
            central_keys=central_keys,
            row_key=row_key,
            clock=clock,
            quota=quota,
            on_alert=on_alert,
        )
        trail.quarantine = quarantine
        try:
            if state.size == 0:
                await trail._append_genesis()
            if quarantine is not None:
                await trail.append(
                    "audit.quarantined",
                    "agent",
                    {
                        "file": quarantine.moved_to.name,
                        "reason": quarantine.reason[:500],
                    },
                )
        except BaseException:
            await trail.close()
            raise
        return trail

    async def close(self) -> None:
        """Commit what is pending, then close the database."""
        if self._closing:
            return
        self._closing = True
        self._wakeup.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        await self._store.close()

    @property
    def store(self) -> SQLiteStore:
        return self._store

    @property
    def size(self) -> int:
        return self._state.size

    # --- appending ---------------------------------------------------------------------

    async def append(self, kind: str, actor: str, data: dict[str, Any]) -> Appended:
        """Record one entry. Returns once it is committed and covered by a
        signed checkpoint. Raises :class:`AuditTrailFullError` when the quota
        is reached, ``KeyRevokedError`` when this appliance may no longer sign,
        and ``UsageError`` for data that cannot be an entry."""
        return await self.append_built(lambda _c, _i, _t: Built([(kind, actor, data)]))

    async def append_built(self, builder: Builder) -> Appended:
        """Record the entries ``builder`` makes once it knows their first index.

        The builder runs in the writer's thread, inside the transaction: it may
        read the database, and its ``side_write`` commits atomically with the
        entries. It must be quick and must not await.
        """
        if self._closing:
            raise AuditTrailClosedError("audit trail is closed")
        future: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(builder, future))
        self._wakeup.set()
        # Not shielded: a caller cancelled before the commit takes its entry
        # out of the batch; one cancelled during the commit may still find
        # its entry recorded (it is, durably).
        return await future

    async def _append_genesis(self) -> None:
        certificate = self._signer.certificate
        if certificate is None:
            raise AuditTrailError("cannot begin an audit log before the appliance is enrolled")
        record = genesis_entry(
            appliance_id=self.appliance_id,
            key_id=self._signer.signing_key().key_id,
            certificate_serial=certificate.certificate.serial,
            ts=self._clock(),
        )
        await self.append_built(
            lambda _c, _i, _t: Built([(GENESIS_KIND, "agent", record.entry.data)])
        )

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = self._take_batch()
                await self._commit_batch(batch)
            if self._closing and not self._queue:
                return

    def _take_batch(self) -> list[_Pending]:
        batch, self._queue = self._queue[:MAX_COMMIT_ENTRIES], self._queue[MAX_COMMIT_ENTRIES:]
        return [pending for pending in batch if not pending.future.done()]

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        try:
            key = self._signer.signing_key()
            certificate = self._signer.certificate
            if certificate is None:
                raise AuditTrailError("no certificate: the appliance is not enrolled")
            now = self._clock()
            commit = await self._store.run(
                lambda c: self._commit_in_thread(c, batch, key, certificate, now)
            )
        except BaseException as exc:  # every waiter learns why; nothing was committed
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._state = commit.state
        if commit.recorded_serial is not None:
            self._recorded_serial = commit.recorded_serial
        for pending, outcome in zip(batch, commit.results, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
        for name, details in commit.alerts:
            self._alert(name, details)
        self._check_quota_alerts(commit.used_bytes)

    # The writer thread ------------------------------------------------------------------

    def _commit_in_thread(
        self,
        connection: sqlite3.Connection,
        batch: list[_Pending],
        key: SigningKey,
        certificate: VerifiedDelegation,
        now: datetime,
    ) -> _Commit:
        quota = self._quota
        saved = (quota.refused, quota.refused_since)
        connection.execute("BEGIN IMMEDIATE")
        try:
            commit = self._build_commit(connection, batch, key, certificate, now)
        except BaseException:
            connection.execute("ROLLBACK")
            quota.refused, quota.refused_since = saved
            self._head_checkpoint = None
            raise
        connection.execute("COMMIT")
        if commit.head_checkpoint is not None:
            self._head_checkpoint = commit.head_checkpoint
        commit.used_bytes = _used_bytes(connection) if quota.limit is not None else 0
        return commit

    def _build_commit(
        self,
        connection: sqlite3.Connection,
        batch: list[_Pending],
        key: SigningKey,
        certificate: VerifiedDelegation,
        now: datetime,
    ) -> _Commit:
        state = self._state.copy()
        commit = _Commit(state)
        quota_before = (self._quota.refused, self._quota.refused_since)
        rows: list[tuple[int, bytes, bytes, bytes]] = []
        nodes: list[tuple[int, int, bytes]] = []
        side_writes: list[Callable[[sqlite3.Connection], None]] = []
        adding = 0  # bytes of this commit so far, for the quota

        def add(record: EntryRecord) -> int:
            nonlocal adding
            index = record.entry.index
            rows.append(
                (
                    index,
                    record.raw,
                    record.leaf_hash,
                    row_mac(self._row_key, index, record.leaf_hash),
                )
            )
            adding += len(record.raw) + ROW_OVERHEAD
            for level, node in enumerate(state.append_completing(record.leaf_hash), start=1):
                if level >= NODE_MIN_LEVEL:
                    nodes.append((level, (state.size >> level) - 1, node))
            return record.entry.index

        def add_internal(kind: str, data: dict[str, Any]) -> None:
            add(make_entry(state.size, now, kind, "agent", data))

        used = _used_bytes(connection) if self._quota.limit is not None else 0
        if self._quota.refused and not self._would_overflow(used, 4 * ROW_OVERHEAD):
            add_internal("audit.gap", self._close_gap(now))
        for pending in batch:
            try:
                built = pending.builder(connection, state.size, now)
                # Every entry is built (and so validated) at the index it will
                # get before any is added: a bad one cannot leave a gap.
                records = [
                    make_entry(state.size + offset, now, *entry)
                    for offset, entry in enumerate(built.entries)
                ]
                needed = sum(len(record.raw) + ROW_OVERHEAD for record in records)
                if self._would_overflow(used + adding, needed):
                    commit.results.append(self._refuse(now, len(records), add_internal, commit))
                    continue
            except Exception as exc:  # this caller's error, not the commit's
                commit.results.append(exc)
                continue
            indices = tuple(add(record) for record in records)
            if built.side_write is not None:
                side_writes.append(built.side_write)
            commit.results.append(Appended(indices, 0, built.result))

        if rows:
            connection.executemany(
                "INSERT INTO entries (idx, raw, leaf, mac) VALUES (?, ?, ?, ?)", rows
            )
            if nodes:
                connection.executemany(
                    "INSERT INTO nodes (level, position, hash) VALUES (?, ?, ?)", nodes
                )
            for side_write in side_writes:
                side_write(connection)
            checkpoint = make_checkpoint(key, appliance_id=self.appliance_id, state=state, ts=now)
            # The previous latest checkpoint is the one at the size the commit
            # started from (sync checkpoints are never above the head).
            previous = self._head_checkpoint
            _store_checkpoint(connection, state, checkpoint, key.key_id, previous=previous)
            commit.head_checkpoint = (state.size, False)
            serial = certificate.certificate.serial
            if serial != self._recorded_serial:  # once per certificate, not per commit
                connection.execute(
                    "INSERT OR IGNORE INTO certificates (serial, key_id, envelope) "
                    "VALUES (?, ?, ?)",
                    (serial, key.key_id, certificate.envelope.to_json()),
                )
                commit.recorded_serial = serial
        if (self._quota.refused, self._quota.refused_since) != quota_before:
            _write_meta(connection, "quota_refused", str(self._quota.refused))
            _write_meta(connection, "quota_refused_since", self._quota.refused_since or "")
        commit.results = [
            Appended(r.indices, state.size, r.result) if isinstance(r, Appended) else r
            for r in commit.results
        ]
        return commit

    def _would_overflow(self, used: int, adding: int) -> bool:
        limit = self._quota.limit
        return limit is not None and used + adding > limit

    def _refuse(
        self,
        now: datetime,
        count: int,
        add_internal: Callable[[str, dict[str, Any]], None],
        commit: _Commit,
    ) -> AuditTrailFullError:
        quota = self._quota
        if not quota.refused:
            # The first refusal is itself recorded, beyond the quota: the one
            # entry that says entries are being refused from now on.
            quota.refused_since = format_time(now)
            add_internal("audit.full", {"quota_bytes": quota.limit})
            commit.alerts.append(("audit.full", {"quota_bytes": quota.limit}))
        quota.refused += count
        return AuditTrailFullError(
            f"audit trail is full (quota {quota.limit} bytes): entry not recorded; "
            f"{quota.refused} refused since {quota.refused_since}"
        )

    def _close_gap(self, now: datetime) -> dict[str, Any]:
        quota = self._quota
        record = {"refused": quota.refused, "since": quota.refused_since, "until": format_time(now)}
        quota.refused, quota.refused_since = 0, None
        return record

    def _alert(self, name: str, details: dict[str, Any]) -> None:
        log.warning("audit trail alert %s: %s", name, details)
        if self._on_alert is not None:
            try:
                self._on_alert(name, details)
            except Exception:
                log.exception("audit alert hook failed")

    def _check_quota_alerts(self, used: int) -> None:
        quota = self._quota
        if quota.limit is None:
            return
        level = used / quota.limit
        crossed = [
            threshold for threshold in QUOTA_ALERT_LEVELS if level >= threshold > quota.alerted
        ]
        if not crossed:
            return
        quota.alerted = crossed[-1]
        details = {"used_bytes": used, "quota_bytes": quota.limit, "percent": round(level * 100, 1)}
        self._alert("audit.quota", details)
        task = asyncio.create_task(self._record_quota_alert(details))
        task.add_done_callback(_log_failure)

    async def _record_quota_alert(self, details: dict[str, Any]) -> None:
        with contextlib.suppress(AuditTrailFullError, AuditTrailClosedError):
            await self.append("audit.quota", "agent", details)
            await self._store.write(
                lambda c: _write_meta(c, "quota_alerted", str(self._quota.alerted))
            )

    # --- reading -------------------------------------------------------------------------

    async def head(self) -> Head:
        def read(connection: sqlite3.Connection) -> Head:
            row = connection.execute(
                "SELECT envelope FROM checkpoints WHERE size = ?", (self._state.size,)
            ).fetchone()
            receipt = connection.execute("SELECT MAX(size) FROM receipts").fetchone()[0]
            return Head(
                self._state.size,
                self._state.root(),
                parse_envelope(bytes(row[0])) if row else None,
                receipt or 0,
            )

        return await self._store.run(read)

    async def entries(self, start: int, end: int) -> list[bytes]:
        """The canonical bytes of entries ``start`` (inclusive) to ``end``."""
        return await self._store.run(lambda c: _entries(c, start, end))

    async def prove(self, index: int, size: int | None = None) -> list[bytes]:
        """Inclusion proof of entry ``index`` in the tree of ``size`` (default: now)."""
        size = self._state.size if size is None else size
        self._check_size(size)
        return await self._store.run(lambda c: inclusion_proof(index, size, _Subtrees(c)))

    async def consistency(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """Consistency proof from the tree of ``old_size`` to ``new_size`` (default: now)."""
        new_size = self._state.size if new_size is None else new_size
        self._check_size(new_size)
        return await self._store.run(lambda c: consistency_proof(old_size, new_size, _Subtrees(c)))

    async def root_at(self, size: int) -> bytes:
        self._check_size(size)
        return await self._store.run(lambda c: _Subtrees(c).root(size))

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self._state.size:
            raise ValueError(f"size {size} is outside the log (0..{self._state.size})")

    # --- checkpoints and receipts for sync ------------------------------------------------

    async def checkpoint_at(self, size: int) -> Envelope:
        """A checkpoint of exactly ``size``: the stored one, or a new one signed
        now (and kept, so a retry sends the same bytes)."""
        self._check_size(size)
        key = self._signer.signing_key()

        def get(connection: sqlite3.Connection) -> Envelope:
            row = connection.execute(
                "SELECT envelope FROM checkpoints WHERE size = ?", (size,)
            ).fetchone()
            if row is not None:
                # Sent to the server: keep it (a receipt will bind its bytes).
                connection.execute("UPDATE checkpoints SET for_sync = 1 WHERE size = ?", (size,))
                if self._head_checkpoint is not None and self._head_checkpoint[0] == size:
                    self._head_checkpoint = (size, True)
                return parse_envelope(bytes(row[0]))
            subtrees = _Subtrees(connection)
            state = subtrees.tree_state(size)
            checkpoint = make_checkpoint(
                key, appliance_id=self.appliance_id, state=state, ts=self._clock()
            )
            _store_checkpoint(connection, state, checkpoint, key.key_id, for_sync=True)
            return checkpoint

        return await self._store.write(get)

    async def _sent_unanswered(self, server_size: int) -> int:
        """The largest checkpoint sent for sync beyond ``server_size`` (0:
        none). Batches shrink when the server struggles, so a retry can be
        smaller than a batch the server witnessed without its answer
        arriving (a timeout, a cut, a restart of either side)."""

        def read(connection: sqlite3.Connection) -> int:
            (size,) = connection.execute(
                "SELECT MAX(size) FROM checkpoints WHERE for_sync = 1 AND size > ?",
                (server_size,),
            ).fetchone()
            return int(size or 0)

        return await self._store.run(read)

    async def store_receipt(self, receipt: Envelope, checkpoint: Envelope) -> int:
        """Keep the server's cosignature of ``checkpoint`` after checking it."""
        delegation = await self._checkpoint_certificate(checkpoint)
        verified_checkpoint = check_checkpoint(checkpoint, delegation=delegation).unwrap()
        verified = check_receipt(
            receipt, roots=self._central_keys, checkpoint=verified_checkpoint
        ).unwrap()
        size = verified.receipt.size
        received_at = format_time(self._clock())
        await self._store.write(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO receipts (size, envelope, received_at) VALUES (?, ?, ?)",
                (size, receipt.to_json(), received_at),
            )
        )
        return size

    async def _checkpoint_certificate(self, checkpoint: Envelope) -> VerifiedDelegation:
        key_id = checkpoint.signatures[0].keyid

        def find(connection: sqlite3.Connection) -> bytes | None:
            row = connection.execute(
                "SELECT envelope FROM certificates WHERE key_id = ? ORDER BY rowid DESC LIMIT 1",
                (key_id,),
            ).fetchone()
            return bytes(row[0]) if row else None

        stored = await self._store.run(find)
        if stored is None:
            raise AuditTrailError(f"no certificate recorded for key {key_id}")
        return check_delegation(
            parse_envelope(stored), roots=self._central_keys, at=self._clock(), allow_expired=True
        ).unwrap()

    async def sync(
        self,
        client: CentralClient,
        *,
        max_batch: int | None = None,
        sizer: BatchSizer | None = None,
        before_batch: Callable[[], Awaitable[object]] | None = None,
    ) -> SyncReport:
        """Upload what the central server lacks, in bounded batches, keeping
        each receipt. Resumable: a batch that failed is sent again from where
        the server is, never from the start.

        Batches hold ``max_batch`` entries, or as many as ``sizer`` says: it
        hears how long each batch took and every refusal for load, so a
        struggling server gets smaller batches (give one or the other, not
        both; neither means the protocol's limit). ``before_batch`` is
        awaited before every batch: the runtime lets urgent incidents go
        first there.

        Raises ``CentralUnavailable`` (try later; what was receipted stays
        receipted), :class:`AuditSyncRejected` when the server refuses the
        history (a security problem to report, never to retry blindly), and
        :class:`LocalTruncationError` when the server holds more of this log
        than the appliance does.
        """
        if max_batch is not None and sizer is not None:
            raise ValueError("give max_batch or a sizer, not both")
        fixed = MAX_SYNC_ENTRIES if max_batch is None else max_batch
        head = await self.head()
        server_size = head.receipt_size
        start, batches, stale_answers = server_size, 0, 0
        while server_size < self.size:
            if before_batch is not None:
                await before_batch()
            target = min(self.size, server_size + (fixed if sizer is None else sizer.size))
            # A batch sent earlier whose answer never came may have been
            # witnessed: never send less than it (a checkpoint smaller than
            # the server holds reads as a truncated history, an alert), and
            # resending its very checkpoint gets the stored receipt back.
            if self._maybe_witnessed is None:
                self._maybe_witnessed = await self._sent_unanswered(server_size)
            if self._maybe_witnessed > server_size:
                target = max(target, self._maybe_witnessed)
            checkpoint = await self.checkpoint_at(target)
            request = SyncRequest.build(
                old_size=server_size,
                entries=await self.entries(server_size, target),
                consistency=await self.consistency(server_size, target),
                checkpoint=checkpoint,
            )
            sent_at = time.monotonic()
            try:
                response = await client.sync_audit(self.appliance_id, request)
            except CentralUnavailable as exc:
                if not exc.not_acted_on:
                    self._maybe_witnessed = max(self._maybe_witnessed, target)
                if sizer is not None and exc.shed_load:
                    sizer.refused()
                raise
            except CentralRejected as exc:
                told = exc.extra.get("server_size")
                if not isinstance(told, int) or exc.code not in ("stale-size", "truncated-history"):
                    raise AuditSyncRejected(exc) from exc
                if told > self.size:
                    raise LocalTruncationError(
                        f"the central server holds {told} entries of this log, "
                        f"the appliance only {self.size}: entries were lost locally "
                        "(restored from an old backup, or removed)"
                    ) from exc
                if exc.code != "stale-size":
                    raise AuditSyncRejected(exc) from exc
                stale_answers += 1
                if told == server_size or stale_answers > 3:
                    raise AuditSyncRejected(exc) from exc
                server_size = told
                continue
            if sizer is not None:
                sizer.answered(time.monotonic() - sent_at)
            received = await self.store_receipt(response.receipt, checkpoint)
            if received != target:
                raise AuditSyncRejected(
                    CentralRejected(200, "wrong-receipt", f"receipt for {received}, sent {target}")
                )
            server_size, batches = target, batches + 1
        return SyncReport(start, server_size, batches)

    # --- verification ----------------------------------------------------------------------

    async def verify(self) -> AuditVerification:
        """Recompute the whole log from its stored bytes and check every
        checkpoint and receipt against it. Names the first bad entry and why."""
        return await self._store.run(
            lambda c: verify_database(c, self._central_keys, self._clock(), self._row_key)
        )


# --- helpers that run in the store's thread ---------------------------------------------


class _Subtrees:
    """A subtree source (``merkle.SubtreeSource``) over the stored log."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __call__(self, start: int, end: int) -> bytes:
        width = end - start
        if width <= 0:
            raise ValueError(f"empty subtree [{start}, {end})")
        if width <= NODE_WIDTH:
            return root_of(self._leaves(start, end))
        if width & (width - 1) == 0 and start % width == 0:
            level = width.bit_length() - 1
            row = self._connection.execute(
                "SELECT hash FROM nodes WHERE level = ? AND position = ?", (level, start >> level)
            ).fetchone()
            if row is None:
                raise AuditTrailError(f"missing stored node for [{start}, {end})")
            return bytes(row[0])
        split = 1 << ((width - 1).bit_length() - 1)
        return node_hash(self(start, start + split), self(start + split, end))

    def _leaves(self, start: int, end: int) -> list[bytes]:
        rows = self._connection.execute(
            "SELECT leaf FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end)
        ).fetchall()
        if len(rows) != end - start:
            raise AuditTrailError(f"entries [{start}, {end}) are incomplete")
        return [bytes(row[0]) for row in rows]

    def root(self, size: int) -> bytes:
        return self(0, size) if size else EMPTY_ROOT

    def tree_state(self, size: int) -> TreeState:
        """The compact range at ``size``: one perfect subtree per set bit."""
        nodes, start = [], 0
        for bit in reversed(range(size.bit_length())):
            width = 1 << bit
            if size & width:
                nodes.append(self(start, start + width))
                start += width
        return TreeState(size, nodes)


def _entries(connection: sqlite3.Connection, start: int, end: int) -> list[bytes]:
    rows = connection.execute(
        "SELECT raw FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end)
    ).fetchall()
    return [bytes(row[0]) for row in rows]


def row_mac(key: bytes, index: int, leaf: bytes) -> bytes:
    """The row authentication code: keyed BLAKE2s over the index and leaf hash.

    Checkpoints prove a block of entries is intact; this names the exact row
    that is not, and cannot be recomputed by someone who can write the
    database but not read the agent's key directory. (BLAKE2's keyed mode is
    a MAC by design, and at under a microsecond a row it keeps verification
    fast; HMAC-SHA256 costs several times more from Python.)"""
    return hashlib.blake2s(index.to_bytes(8, "big") + leaf, key=key).digest()


def _store_checkpoint(
    connection: sqlite3.Connection,
    state: TreeState,
    checkpoint: Envelope,
    key_id: str,
    *,
    for_sync: bool = False,
    previous: tuple[int, bool] | None = None,
) -> None:
    """Insert ``checkpoint``. The previous latest one (given, or looked up) is
    dropped unless it is the last of its block of CHECKPOINT_SPACING entries
    or was made for sync."""
    if previous is None:
        row = connection.execute(
            "SELECT size, for_sync FROM checkpoints WHERE size < ? ORDER BY size DESC LIMIT 1",
            (state.size,),
        ).fetchone()
        previous = (int(row[0]), bool(row[1])) if row else None
    connection.execute(
        "INSERT OR REPLACE INTO checkpoints (size, envelope, nodes, key_id, for_sync) "
        "VALUES (?, ?, ?, ?, ?)",
        (state.size, checkpoint.to_json(), b"".join(state.nodes), key_id, int(for_sync)),
    )
    if for_sync or previous is None:
        return
    old, old_for_sync = previous
    if not old_for_sync and old // CHECKPOINT_SPACING == state.size // CHECKPOINT_SPACING:
        connection.execute("DELETE FROM checkpoints WHERE size = ?", (old,))


def _write_meta(connection: sqlite3.Connection, key: str, value: str) -> None:
    connection.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def _read_meta(connection: sqlite3.Connection, key: str) -> str | None:
    row = connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def _used_bytes(connection: sqlite3.Connection) -> int:
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    size = connection.execute("PRAGMA page_size").fetchone()[0]
    return int(pages) * int(size)


def _load_state(
    connection: sqlite3.Connection, quota_bytes: int | None, central_keys: Sequence[VerifyKey]
) -> tuple[TreeState, _Quota]:
    """The tree at the head, from the latest checkpoint's compact range.

    Raises :class:`AuditTrailError` when the stored log is not consistent
    with its latest checkpoint (the caller quarantines it): entries and their
    checkpoint always commit together, so any difference was made behind the
    agent's back.
    """
    quota = _Quota(
        limit=quota_bytes,
        alerted=float(_read_meta(connection, "quota_alerted") or 0.0),
        refused=int(_read_meta(connection, "quota_refused") or 0),
        refused_since=_read_meta(connection, "quota_refused_since") or None,
    )
    count = connection.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    row = connection.execute(
        "SELECT size, nodes, envelope FROM checkpoints ORDER BY size DESC LIMIT 1"
    ).fetchone()
    if row is None:
        if count:
            raise AuditTrailError(f"the audit log has {count} entries and no checkpoint")
        return TreeState(), quota
    size, blob, envelope = int(row[0]), bytes(row[1]), parse_envelope(bytes(row[2]))
    if size != count:
        raise AuditTrailError(
            f"the audit log holds {count} entries but its latest checkpoint covers {size}"
        )
    state = TreeState(size, [blob[i : i + 32] for i in range(0, len(blob), 32)])
    problem = _Verifier(connection, central_keys, utc_now(), b"").checkpoint_problem(
        size, to_hex(state.root()), envelope
    )
    if problem is not None:
        raise AuditTrailError(f"the head of the audit log does not verify: {problem}")
    return state, quota


def verify_database(
    connection: sqlite3.Connection,
    central_keys: Sequence[VerifyKey],
    now: datetime,
    row_key: bytes,
) -> AuditVerification:
    """Recompute a stored log and check it (see OfflineAuditTrail.verify).

    (1) every certificate that signed a checkpoint is the central server's;
    (2) entries are numbered 0..n-1 without a gap, each stored leaf hash is
        the hash of the stored bytes, and each row's authentication code (a
        keyed hash of its index and leaf, under a key only the agent holds)
        holds — a changed, deleted, inserted or moved row, named exactly;
    (3) entry 0 is the genesis;
    (4) every checkpoint is signed by a certified key and its root is the
        root of the entries it covers — rows changed together with their
        hashes, reordered, or a removed tail;
    (5) every receipt is the central server's, for a root the log has.
    A root mismatch is narrowed to the first entry of the block that does not
    parse at its position, where one does not.
    """
    return _Verifier(connection, central_keys, now, row_key).run()


class _Verifier:
    def __init__(
        self,
        connection: sqlite3.Connection,
        central_keys: Sequence[VerifyKey],
        now: datetime,
        row_key: bytes,
    ) -> None:
        self.connection = connection
        self.row_key = row_key
        self.central_keys = central_keys
        self.now = now
        self.certificates: dict[str, VerifiedDelegation] = {}
        self.checkpoints: dict[int, bytes] = {}
        self.receipts: dict[int, bytes] = {}
        self.state = TreeState()

    def result(self, index: int | None = None, problem: str | None = None) -> AuditVerification:
        return AuditVerification(
            self.state.size, len(self.checkpoints), len(self.receipts), index, problem
        )

    def run(self) -> AuditVerification:
        # Both are small: one checkpoint per 1,024 entries, one receipt per sync.
        self.checkpoints = {
            int(size): bytes(envelope)
            for size, envelope in self.connection.execute("SELECT size, envelope FROM checkpoints")
        }
        self.receipts = {
            int(size): bytes(envelope)
            for size, envelope in self.connection.execute("SELECT size, envelope FROM receipts")
        }
        if (problem := self.load_certificates()) is not None:  # (1)
            return self.result(None, problem)
        marks = sorted(set(self.checkpoints) | set(self.receipts))
        mark = 0  # position in marks
        next_mark = marks[0] if marks else -1
        block_start = 0
        # The hot loop: one SHA-256, one MAC and one tree append per entry,
        # with everything looked up once.
        sha256 = hashlib.sha256
        blake2s = hashlib.blake2s
        key = self.row_key
        append = self.state.append
        expected = 0
        for rows in _chunks(self.connection):
            for index, raw, stored_leaf, stored_mac in rows:
                if index != expected:  # (2)
                    return self.result(
                        min(index, expected),
                        f"row numbered {index} where {expected} was expected: "
                        "rows were deleted or inserted",
                    )
                leaf = sha256(b"\x00" + raw).digest()
                if leaf != stored_leaf:
                    return self.result(
                        index,
                        "stored bytes do not match the stored leaf hash: the entry was changed",
                    )
                if blake2s(index.to_bytes(8, "big") + leaf, key=key).digest() != stored_mac:
                    return self.result(
                        index,
                        "row authentication code does not match: the entry was changed or moved",
                    )
                if index == 0 and (problem := _genesis_problem(raw)) is not None:  # (3)
                    return self.result(0, problem)
                append(leaf)
                expected += 1
                while expected == next_mark:  # (4) (5)
                    problem = self.check_mark(expected)
                    if problem is not None:
                        bad = _first_unparsable(self.connection, block_start, expected)
                        return self.result(bad, problem)
                    block_start = expected
                    mark += 1
                    next_mark = marks[mark] if mark < len(marks) else -1
        if mark < len(marks):
            return self.result(
                self.state.size,
                f"a checkpoint or receipt covers {marks[-1]} entries but the log has "
                f"{self.state.size}: its tail was removed",
            )
        covered = max(self.checkpoints, default=0)
        if self.state.size > covered:
            return self.result(
                covered,
                f"entries {covered}..{self.state.size - 1} are not covered by any checkpoint: "
                "they were added behind the agent's back",
            )
        return self.result()

    def load_certificates(self) -> str | None:
        for serial, key_id, envelope in self.connection.execute(
            "SELECT serial, key_id, envelope FROM certificates"
        ):
            try:
                self.certificates[key_id] = check_delegation(
                    parse_envelope(bytes(envelope)),
                    roots=self.central_keys,
                    at=self.now,
                    allow_expired=True,
                ).unwrap()
            except ProtocolError as exc:
                return f"certificate {serial}: {exc}"
        return None

    def checkpoint_problem(self, size: int, root: str, envelope: Envelope) -> str | None:
        if not self.certificates and (problem := self.load_certificates()) is not None:
            return problem
        delegation = self.certificates.get(envelope.signatures[0].keyid)
        if delegation is None:
            return f"checkpoint at size {size} is signed by a key with no recorded certificate"
        try:
            verified = check_checkpoint(envelope, delegation=delegation).unwrap().checkpoint
        except ProtocolError as exc:
            return f"checkpoint at size {size}: {exc}"
        if verified.size != size:
            return f"checkpoint stored at size {size} is for size {verified.size}"
        if verified.root != root:
            return f"root of the first {size} entries does not match their signed checkpoint"
        return None

    def check_mark(self, size: int) -> str | None:
        root = to_hex(self.state.root())
        checkpoint = self.checkpoints.get(size)
        if checkpoint is not None:
            try:
                envelope = parse_envelope(checkpoint)
            except ProtocolError as exc:
                return f"checkpoint at size {size}: {exc}"
            if (problem := self.checkpoint_problem(size, root, envelope)) is not None:
                return problem
        receipt = self.receipts.get(size)
        if receipt is not None:
            try:
                verified_receipt = check_receipt(
                    parse_envelope(receipt), roots=self.central_keys
                ).unwrap()
            except ProtocolError as exc:
                return f"receipt at size {size}: {exc}"
            if verified_receipt.receipt.root != root:
                return (
                    f"root of the first {size} entries does not match the central server's receipt"
                )
        return None


def _chunks(
    connection: sqlite3.Connection, size: int = 10_000
) -> Iterator[list[tuple[int, bytes, bytes, bytes]]]:
    cursor = connection.execute("SELECT idx, raw, leaf, mac FROM entries ORDER BY idx")
    while rows := cursor.fetchmany(size):
        yield rows


def _genesis_problem(raw: bytes) -> str | None:
    try:
        entry = parse_entry(raw, expected_index=0).entry
    except ProtocolError as exc:
        return str(exc)
    if entry.kind != GENESIS_KIND:
        return f"the first entry is {entry.kind}, not {GENESIS_KIND}"
    return None


def _first_unparsable(connection: sqlite3.Connection, start: int, end: int) -> int:
    """The first entry in [start, end) that is not a valid entry at its
    position; ``start`` when all parse (the block as a whole is wrong)."""
    for index, raw in connection.execute(
        "SELECT idx, raw FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end)
    ):
        try:
            parse_entry(bytes(raw), expected_index=index)
        except ProtocolError:
            return int(index)
    return start


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("recording an audit quota alert failed: %s", task.exception())


__all__ = [
    "Appended",
    "AuditSyncRejected",
    "AuditTrailError",
    "AuditTrailFullError",
    "AuditVerification",
    "Built",
    "Head",
    "LocalTruncationError",
    "OfflineAuditTrail",
    "SyncReport",
    "row_mac",
    "verify_database",
]
