"""The audit log's documents: entries, checkpoints and receipts.

An entry is ``{index, ts, kind, actor, data}``; its leaf hash is
``SHA-256(0x00 || JCS(entry))``. Entries travel and rest as their exact
canonical bytes, so a receiver parses the bytes to check the fields and hashes
the same bytes: nobody re-encodes what was hashed. Index 0 is always
``chain.genesis``.

A *checkpoint* ``{origin: "msp/<appliance_id>", size, root, ts}`` is signed by
the appliance's delegated key at every commit. A *receipt* is the central
server's cosignature of a checkpoint it has witnessed: it binds (origin, size,
root) and the digest of the checkpoint the appliance signed.

:class:`LogReplay` recomputes a log from its entries alone and names the first
index that is wrong and why; the agent's ``verify()``, the server's ingest and
an auditor's check of an export are all built on it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

from pydantic import Field, StrictInt, StringConstraints

from msp_protocol.canonical import canonicalize, parse_canonical_json, parse_json
from msp_protocol.delegation import RevocationList, Scope, VerifiedDelegation
from msp_protocol.dsse import Envelope, PayloadType, check_envelope, sign_document
from msp_protocol.encoding import (
    Hash,
    Identifier,
    KeyIdField,
    Serial,
    Timestamp,
    format_time,
    from_hex,
    parse_time,
    to_hex,
)
from msp_protocol.errors import (
    CheckpointError,
    EncodingError,
    LogEntryError,
    MalformedError,
    RevokedError,
    ScopeError,
    SubjectError,
    UsageError,
)
from msp_protocol.keys import SigningKey, VerifyKey
from msp_protocol.limits import DEFAULT_LIMITS, Limits
from msp_protocol.merkle import TreeState, leaf_hash
from msp_protocol.model import WireModel
from msp_protocol.result import Failure, Result, raising

GENESIS_KIND = "chain.genesis"
ORIGIN_PREFIX = "msp/"
# The central server's own log (msp_protocol.central_log): "msp-central/<key id>".
CENTRAL_ORIGIN_PREFIX = "msp-central/"

_KIND_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*){1,3}$"
_ACTOR_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}$"
_KIND = re.compile(_KIND_PATTERN[1:-1])
_ACTOR = re.compile(_ACTOR_PATTERN[1:-1])
MAX_SIZE = 2**53 - 1

EntryKind = Annotated[str, StringConstraints(strict=True, max_length=64, pattern=_KIND_PATTERN)]
Actor = Annotated[str, StringConstraints(strict=True, pattern=_ACTOR_PATTERN)]
_APPLIANCE_ORIGIN = r"msp/[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_CENTRAL_ORIGIN = r"msp-central/[0-9a-f]{16}"
# Receipts cosign appliance checkpoints only.
ApplianceOrigin = Annotated[str, StringConstraints(strict=True, pattern=f"^{_APPLIANCE_ORIGIN}$")]
# A checkpoint is of an appliance's log or of the central server's own; the
# prefixes differ, so no origin names both.
Origin = Annotated[
    str,
    StringConstraints(strict=True, pattern=f"^(?:{_APPLIANCE_ORIGIN}|{_CENTRAL_ORIGIN})$"),
]
Size = Annotated[StrictInt, Field(ge=0, le=MAX_SIZE)]


def origin_for(appliance_id: str) -> str:
    return ORIGIN_PREFIX + appliance_id


class LogEntry(WireModel):
    document_name = "log entry"

    index: Size
    ts: Timestamp  # the appliance's clock: metadata, never used for ordering
    kind: EntryKind
    actor: Actor
    data: dict[str, Any]


class GenesisData(WireModel):
    """What entry 0 says: whose log this is and which key began it."""

    document_name = "genesis data"

    appliance_id: Identifier
    key_id: KeyIdField
    certificate_serial: Serial


class EntryRecord:
    """An entry with the exact bytes it was parsed from and their leaf hash.

    The model (``entry``) is built on first use: the witness checks a
    thousand entries a batch and needs only their bytes, hashes and kinds.
    Two records are equal when their bytes are.
    """

    __slots__ = ("_entry", "_fields", "leaf_hash", "raw")

    raw: bytes
    leaf_hash: bytes
    _entry: LogEntry | None
    _fields: tuple[int, datetime, str, str, dict[str, Any]] | None

    def __init__(
        self,
        raw: bytes,
        entry: LogEntry | None,
        leaf_hash: bytes,
        fields: tuple[int, datetime, str, str, dict[str, Any]] | None = None,
    ) -> None:
        if entry is None and fields is None:
            raise UsageError("an entry record needs its entry or its checked fields")
        for name, value in (
            ("raw", raw),
            ("leaf_hash", leaf_hash),
            ("_entry", entry),
            ("_fields", fields),
        ):
            object.__setattr__(self, name, value)

    @property
    def entry(self) -> LogEntry:
        entry = self._entry
        if entry is None:
            assert self._fields is not None
            index, ts, kind, actor, data = self._fields
            entry = LogEntry.model_construct(index=index, ts=ts, kind=kind, actor=actor, data=data)
            object.__setattr__(self, "_entry", entry)
        return entry

    @property
    def kind(self) -> str:
        if self._entry is not None:
            return self._entry.kind
        assert self._fields is not None
        return self._fields[2]

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("an entry record is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EntryRecord) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"EntryRecord(raw={self.raw!r})"


def make_entry(
    index: int, ts: datetime, kind: str, actor: str, data: dict[str, Any]
) -> EntryRecord:
    """Build an entry and its canonical bytes.

    Checks the same rules as :class:`LogEntry` but directly, without building
    the model through pydantic: this is the appliance's hot path (a property
    test holds both to the same verdicts and bytes). Raises
    :class:`UsageError` for anything that could not be a valid entry.
    """
    if type(index) is not int or not 0 <= index <= MAX_SIZE:
        raise UsageError(f"log entry: index must be an integer in 0..{MAX_SIZE}, got {index!r}")
    if not isinstance(kind, str) or len(kind) > 64 or _KIND.fullmatch(kind) is None:
        raise UsageError(f"log entry: kind {str(kind)[:70]!r} is not a dotted lowercase name")
    if not isinstance(actor, str) or _ACTOR.fullmatch(actor) is None:
        raise UsageError(f"log entry: actor {str(actor)[:130]!r} is not a valid actor name")
    if type(data) is not dict:
        raise UsageError("log entry: data must be a JSON object")
    try:
        ts_text = format_time(ts)
    except (EncodingError, AttributeError, TypeError) as exc:
        raise UsageError(f"log entry: ts: {exc}") from None
    # RFC 8785 orders the members actor, data, index, kind, ts; kind, actor and
    # the time are plain ASCII that JSON never escapes, so only the free-form
    # data goes through the encoder.
    raw = b"".join(
        (
            b'{"actor":"',
            actor.encode("ascii"),
            b'","data":',
            canonicalize(data),
            b',"index":',
            str(index).encode("ascii"),
            b',"kind":"',
            kind.encode("ascii"),
            b'","ts":"',
            ts_text.encode("ascii"),
            b'"}',
        )
    )
    entry = LogEntry.model_construct(
        index=index, ts=ts.astimezone(UTC), kind=kind, actor=actor, data=dict(data)
    )
    return EntryRecord(raw, entry, leaf_hash(raw))


def parse_entry(
    raw: bytes,
    *,
    expected_index: int | None = None,
    require_canonical: bool = True,
    limits: Limits = DEFAULT_LIMITS,
) -> EntryRecord:
    """Parse an entry's bytes strictly.

    Raises :class:`MalformedError` if they do not parse as an entry (with
    ``require_canonical``, also if the bytes are not the entry's RFC 8785
    form), and :class:`LogEntryError` if it is not at ``expected_index``.
    """
    where = f"entry {expected_index}" if expected_index is not None else "entry"
    if len(raw) > limits.max_entry_bytes:
        raise MalformedError(f"{where}: {len(raw)} bytes, limit {limits.max_entry_bytes}")
    parse = parse_canonical_json if require_canonical else parse_json
    try:
        value = parse(raw, limits=limits, max_bytes=limits.max_entry_bytes)
        fields = _entry_fields(value)
        if fields is None:
            entry = LogEntry.from_wire(value)  # names what is wrong, or accepts
            fields = (entry.index, entry.ts, entry.kind, entry.actor, entry.data)
    except MalformedError as exc:
        raise type(exc)(f"{where}: {exc}") from None
    if expected_index is not None and fields[0] != expected_index:
        raise LogEntryError(f"{where}: carries index {fields[0]}")
    return EntryRecord(raw, None, leaf_hash(raw), fields)


_ENTRY_FIELDS = frozenset(LogEntry.model_fields)


def _entry_fields(value: Any) -> tuple[int, datetime, str, str, dict[str, Any]] | None:
    """The :class:`LogEntry` rules checked directly (the witness parses every
    entry it is sent). Returns None when any rule fails, for the model to
    find and name the problem; a property test holds both to one verdict."""
    if type(value) is not dict or value.keys() != _ENTRY_FIELDS:
        return None
    index, ts, kind, actor, data = (
        value["index"],
        value["ts"],
        value["kind"],
        value["actor"],
        value["data"],
    )
    if (
        type(index) is not int
        or not 0 <= index <= MAX_SIZE
        or type(kind) is not str
        or len(kind) > 64
        or _KIND.fullmatch(kind) is None
        or type(actor) is not str
        or _ACTOR.fullmatch(actor) is None
        or type(data) is not dict
        or type(ts) is not str
    ):
        return None
    try:
        moment = parse_time(ts, what="ts")
    except EncodingError:
        return None
    return index, moment, kind, actor, data


class LogReplay:
    """Recompute a log from index 0, one entry at a time, in O(log n) memory.

    Each :meth:`add` checks the entry parses, sits at the next index, and (for
    index 0) is the genesis of the expected appliance; :meth:`root` is the
    RFC 6962 root of everything added so far. Given a ``state`` (a compact
    range, :meth:`TreeState.from_compact_range`), the replay resumes at that
    size: the next entry must carry index ``state.size``, and only the root
    compared with a signed checkpoint shows the range was genuine.
    """

    # The kind of entry 0, which no later entry may have.
    genesis_kind: ClassVar[str] = GENESIS_KIND

    def __init__(
        self,
        *,
        appliance_id: str | None = None,
        state: TreeState | None = None,
        require_canonical: bool = True,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.appliance_id = appliance_id
        self.state = state.copy() if state is not None else TreeState()
        self.require_canonical = require_canonical
        self.limits = limits
        self.genesis: GenesisData | None = None

    @property
    def size(self) -> int:
        return self.state.size

    def add(self, raw: bytes) -> EntryRecord:
        index = self.state.size
        record = parse_entry(
            raw,
            expected_index=index,
            require_canonical=self.require_canonical,
            limits=self.limits,
        )
        if index == 0:
            self.check_genesis(record.entry)
        elif record.kind == self.genesis_kind:
            raise LogEntryError(f"entry {index}: a second {self.genesis_kind}")
        self.state.append(record.leaf_hash)
        return record

    def check_genesis(self, entry: LogEntry) -> None:
        """Entry 0 begins this log: raise :class:`LogEntryError` if it does
        not. The central server's log, whose genesis names a key and no
        appliance, overrides this."""
        self.genesis = _check_genesis(entry, self.appliance_id)

    def extend(self, raws: Iterable[bytes]) -> None:
        for raw in raws:
            self.add(raw)

    def root(self) -> bytes:
        return self.state.root()


def _check_genesis(entry: LogEntry, appliance_id: str | None) -> GenesisData:
    if entry.kind != GENESIS_KIND:
        raise LogEntryError(f"entry 0: kind is {entry.kind}, expected {GENESIS_KIND}")
    try:
        genesis = GenesisData.from_wire(entry.data)
    except MalformedError as exc:
        raise LogEntryError(f"entry 0: {exc}") from None
    if appliance_id is not None and genesis.appliance_id != appliance_id:
        raise LogEntryError(
            f"entry 0: genesis of appliance {genesis.appliance_id}, expected {appliance_id}"
        )
    return genesis


# --- checkpoints ---------------------------------------------------------------


class Checkpoint(WireModel):
    document_name = "checkpoint"

    origin: Origin
    size: Size
    root: Hash
    ts: Timestamp  # the signer's clock: metadata

    @property
    def appliance_id(self) -> str:
        """The appliance whose log this is; :class:`UsageError` for a
        checkpoint of the central server's own log."""
        if not self.origin.startswith(ORIGIN_PREFIX):
            raise UsageError(f"checkpoint {self.origin} is not of an appliance's log")
        return self.origin.removeprefix(ORIGIN_PREFIX)

    @property
    def root_bytes(self) -> bytes:
        return from_hex(self.root, length=32, what="checkpoint root")


@dataclass(frozen=True, slots=True)
class VerifiedCheckpoint:
    checkpoint: Checkpoint
    envelope: Envelope
    payload: bytes

    @property
    def digest(self) -> str:
        """SHA-256 of the exact signed payload: what a receipt binds."""
        return hashlib.sha256(self.payload).hexdigest()


def make_checkpoint(
    key: SigningKey, *, appliance_id: str, state: TreeState, ts: datetime
) -> Envelope:
    checkpoint = Checkpoint(
        origin=origin_for(appliance_id), size=state.size, root=to_hex(state.root()), ts=ts
    )
    return sign_document(PayloadType.CHECKPOINT, checkpoint, [key])


def check_checkpoint(
    envelope: Envelope,
    *,
    delegation: VerifiedDelegation,
    revocations: RevocationList | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[VerifiedCheckpoint]:
    """Verify a checkpoint against the (already verified) certificate of the
    key that signed it.

    (1) signed by the certificate's key as a checkpoint — forgery, replay of
        another signed document as a checkpoint;
    (2) well-formed — parser confusion;
    (3) the certificate grants the audit scope — an evidence-only key
        rewriting the log;
    (4) the origin is the certificate's appliance — one appliance's
        checkpoint presented as another's;
    (5) if the certificate's serial is revoked, the checkpoint covers no more
        than the cutoff — a stolen key extending the log after revocation.

    Whether the root matches the entries is the caller's check (it holds them).
    """
    certificate = delegation.certificate
    signed = check_envelope(
        envelope, payload_type=PayloadType.CHECKPOINT, trusted=[certificate.subject], limits=limits
    )  # (1)
    if not signed.ok:
        return Result(None, signed.failures)
    payload = signed.unwrap()
    try:
        checkpoint = Checkpoint.from_wire(payload.value)  # (2)
    except MalformedError as exc:
        return Result.failure(exc)
    failures: list[Failure] = []
    if Scope.AUDIT not in certificate.scopes:  # (3)
        failures.append(ScopeError(f"certificate {certificate.serial} does not grant scope audit"))
    if checkpoint.origin != origin_for(certificate.appliance_id):  # (4)
        failures.append(
            SubjectError(
                f"checkpoint origin {checkpoint.origin} is not appliance {certificate.appliance_id}"
            )
        )
    if revocations is not None:  # (5)
        revoked = revocations.find(certificate.serial)
        if revoked is not None and checkpoint.size > revoked.cutoff_size:
            failures.append(
                RevokedError(
                    f"checkpoint of size {checkpoint.size} signed under certificate "
                    f"{certificate.serial}, revoked beyond size {revoked.cutoff_size}"
                )
            )
    return Result.collect(VerifiedCheckpoint(checkpoint, envelope, payload.payload), failures)


verify_checkpoint = raising(check_checkpoint)


def check_checkpoint_root(checkpoint: Checkpoint, replay: LogReplay) -> Result[None]:
    """Does the checkpoint describe exactly the entries replayed so far?"""
    if checkpoint.size != replay.size:
        return Result.failure(
            CheckpointError(
                f"checkpoint is for size {checkpoint.size}, the log has {replay.size} entries"
            )
        )
    if checkpoint.root != to_hex(replay.root()):
        return Result.failure(
            CheckpointError(f"checkpoint root at size {checkpoint.size} does not match the entries")
        )
    return Result.success(None)


# --- receipts --------------------------------------------------------------------


class Receipt(WireModel):
    """The central server's cosignature: it has witnessed this checkpoint and
    holds the log up to ``size`` as an extension of everything it cosigned
    before."""

    document_name = "receipt"

    origin: ApplianceOrigin
    size: Size
    root: Hash
    checkpoint_sha256: Hash
    witnessed_at: Timestamp  # the server's clock


@dataclass(frozen=True, slots=True)
class VerifiedReceipt:
    receipt: Receipt
    envelope: Envelope
    payload: bytes


def make_receipt(
    root: SigningKey, checkpoint: VerifiedCheckpoint, witnessed_at: datetime
) -> Envelope:
    receipt = Receipt(
        origin=checkpoint.checkpoint.origin,
        size=checkpoint.checkpoint.size,
        root=checkpoint.checkpoint.root,
        checkpoint_sha256=checkpoint.digest,
        witnessed_at=witnessed_at,
    )
    return sign_document(PayloadType.RECEIPT, receipt, [root])


def check_receipt(
    envelope: Envelope,
    *,
    roots: Iterable[VerifyKey],
    checkpoint: VerifiedCheckpoint | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[VerifiedReceipt]:
    """Verify the server's cosignature.

    (1) signed by a trusted central key as a receipt — forged witness;
    (2) well-formed;
    (3) if a checkpoint is given, the receipt is for exactly that one (same
        origin, size, root and signed bytes) — a receipt for one state
        presented as covering another.
    """
    signed = check_envelope(
        envelope, payload_type=PayloadType.RECEIPT, trusted=roots, limits=limits
    )
    if not signed.ok:  # (1)
        return Result(None, signed.failures)
    payload = signed.unwrap()
    try:
        receipt = Receipt.from_wire(payload.value)  # (2)
    except MalformedError as exc:
        return Result.failure(exc)
    failures: list[Failure] = []
    if checkpoint is not None:  # (3)
        cp = checkpoint.checkpoint
        if (receipt.origin, receipt.size, receipt.root) != (cp.origin, cp.size, cp.root):
            failures.append(
                CheckpointError(
                    f"receipt covers {receipt.origin} size {receipt.size}, "
                    f"checkpoint is {cp.origin} size {cp.size}"
                )
            )
        elif receipt.checkpoint_sha256 != checkpoint.digest:
            failures.append(CheckpointError("receipt is for another signing of this checkpoint"))
    return Result.collect(VerifiedReceipt(receipt, envelope, payload.payload), failures)


verify_receipt = raising(check_receipt)


def genesis_entry(
    *, appliance_id: str, key_id: str, certificate_serial: str, ts: datetime, actor: str = "agent"
) -> EntryRecord:
    data = GenesisData(
        appliance_id=appliance_id, key_id=key_id, certificate_serial=certificate_serial
    )
    return make_entry(0, ts, GENESIS_KIND, actor, data.to_wire())
