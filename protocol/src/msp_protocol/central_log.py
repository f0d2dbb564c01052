"""The central server's own audit log: what it did, verifiable offline.

The central server records its own actions (settings changes, enrollment
tokens, revocations, acknowledgements, evidence a partner attached by hand)
in a log of the appliances' shape: the same :class:`~msp_protocol.log.LogEntry`
``{index, ts, kind, actor, data}``, canonical bytes, leaf hashes and RFC 6962
tree. ``actor`` says who acted (``partner:<id>``, ``user:<id>``, ``admin``,
``cli``); ``data`` is a small JSON object.

- Entry 0 is ``central.genesis`` with data ``{"key_id": <central key id>}``.
- A checkpoint is the ordinary :class:`~msp_protocol.log.Checkpoint` with
  origin ``msp-central/<central key id>``, signed directly by the central
  root key (DSSE, payload type ``checkpoint``). An appliance's checkpoint has
  origin ``msp/<appliance id>`` and a device signer, so neither passes for
  the other.
- The *central log export* (``msp.central-log-export.v1``) is the whole log
  with its latest checkpoint, for an auditor; ``msp-verify`` checks it.
- A *central record proof* is one entry with its inclusion proof and a
  checkpoint: what a partner gets, since the whole log holds other partners'
  actions. It has no ``format`` member; ``msp-verify`` checks it too.

Entry 0 names the key that signs the log's checkpoints: a rotation of the
central root key is out of scope (docs/adr/0012-central-log.md), so a
checker requires the genesis to name the checkpoint's signer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import Field

from msp_protocol.canonical import parse_json
from msp_protocol.dsse import Envelope, PayloadType, check_envelope, sign_document
from msp_protocol.encoding import (
    Hash,
    KeyIdField,
    Timestamp,
    b64decode,
    b64encode,
    format_time,
    from_hex,
    to_hex,
)
from msp_protocol.errors import (
    CheckpointError,
    LogEntryError,
    MalformedError,
    ModelError,
    UnsignedEntriesError,
    UsageError,
    VerificationError,
)
from msp_protocol.export import EntryBase64, export_value
from msp_protocol.keys import SigningKey, VerifyKey
from msp_protocol.limits import DEFAULT_LIMITS, Limits
from msp_protocol.log import (
    CENTRAL_ORIGIN_PREFIX,
    Checkpoint,
    EntryRecord,
    LogEntry,
    LogReplay,
    make_entry,
    parse_entry,
)
from msp_protocol.merkle import TreeState, check_inclusion
from msp_protocol.model import WireModel
from msp_protocol.result import Failure, Result, raising

CENTRAL_GENESIS_KIND: Final = "central.genesis"
CENTRAL_LOG_EXPORT_FORMAT: Final = "msp.central-log-export.v1"
# The actor of the genesis entry: the server itself, not a person.
CENTRAL_ACTOR: Final = "central"


def central_origin(key_id: str) -> str:
    """The origin of the central log whose checkpoints ``key_id`` signs:
    ``msp-central/<key id>``. Raises :class:`UsageError` for a malformed id."""
    _require_key_id(key_id)
    return CENTRAL_ORIGIN_PREFIX + key_id


def _require_key_id(key_id: str) -> None:
    try:
        from_hex(key_id, length=8, what="central key id")
    except MalformedError as exc:
        raise UsageError(str(exc)) from None


# --- entries -------------------------------------------------------------------


class CentralGenesisData(WireModel):
    """What entry 0 of the central log says: which key signs its checkpoints."""

    document_name = "central genesis data"

    key_id: KeyIdField


def central_genesis_entry(
    key: VerifyKey | str, ts: datetime, *, actor: str = CENTRAL_ACTOR
) -> EntryRecord:
    """Entry 0 of the central log, naming the central key (or its key id)."""
    key_id = key.key_id if isinstance(key, VerifyKey) else key
    _require_key_id(key_id)
    data = CentralGenesisData(key_id=key_id)
    return make_entry(0, ts, CENTRAL_GENESIS_KIND, actor, data.to_wire())


def check_central_genesis(entry: LogEntry, key_ids: Iterable[str]) -> CentralGenesisData:
    """Entry 0 is ``central.genesis`` naming one of ``key_ids``; raises
    :class:`LogEntryError` otherwise."""
    if entry.kind != CENTRAL_GENESIS_KIND:
        raise LogEntryError(f"entry 0: kind is {entry.kind}, expected {CENTRAL_GENESIS_KIND}")
    try:
        genesis = CentralGenesisData.from_wire(entry.data)
    except MalformedError as exc:
        raise LogEntryError(f"entry 0: {exc}") from None
    expected = sorted(set(key_ids))
    if genesis.key_id not in expected:
        raise LogEntryError(
            f"entry 0: genesis of the central log of key {genesis.key_id}, "
            f"expected key {', '.join(expected)}"
        )
    return genesis


class CentralLogReplay(LogReplay):
    """:class:`LogReplay` for the central log: entry 0 must be the
    ``central.genesis`` of one of ``key_ids`` (the key that signs the
    checkpoint the replay is compared with)."""

    genesis_kind = CENTRAL_GENESIS_KIND

    def __init__(
        self,
        *,
        key_ids: Iterable[str],
        state: TreeState | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(state=state, limits=limits)
        self.key_ids = frozenset(key_ids)
        if not self.key_ids:
            raise UsageError("replaying the central log needs the key id it is signed by")
        self.central_genesis: CentralGenesisData | None = None

    def check_genesis(self, entry: LogEntry) -> None:
        self.central_genesis = check_central_genesis(entry, self.key_ids)


# --- checkpoints ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedCentralCheckpoint:
    """A checkpoint of the central log, signed by the central key ``key_id``
    its origin names; ``payload`` is the exact signed bytes."""

    checkpoint: Checkpoint
    envelope: Envelope
    payload: bytes
    key_id: str


def make_central_checkpoint(root: SigningKey, state: TreeState, ts: datetime) -> Envelope:
    """Sign the checkpoint of the central log at ``state`` with the central
    root key. Raises :class:`UsageError` for an empty log (entry 0, the
    genesis, is always there)."""
    if state.size == 0:
        raise UsageError("a central checkpoint needs at least the genesis entry")
    checkpoint = Checkpoint(
        origin=central_origin(root.key_id), size=state.size, root=to_hex(state.root()), ts=ts
    )
    return sign_document(PayloadType.CHECKPOINT, checkpoint, [root])


def check_central_checkpoint(
    envelope: Envelope, central_keys: Sequence[VerifyKey], *, limits: Limits = DEFAULT_LIMITS
) -> Result[VerifiedCentralCheckpoint]:
    """Verify a checkpoint of the central server's own log.

    (1) signed as a checkpoint by one of the central keys — forgery, an
        appliance's checkpoint (signed by a device key), another signed
        document replayed as a checkpoint;
    (2) well-formed — parser confusion;
    (3) the origin is ``msp-central/<id>`` of a key that signed it — an
        appliance origin under the central signature, the log of another
        central key;
    (4) the size is at least 1 — a checkpoint of a log without its genesis.

    Whether the root matches the entries is the caller's check.
    """
    if not central_keys:
        raise UsageError("verifying a central checkpoint needs at least one central key")
    signed = check_envelope(
        envelope, payload_type=PayloadType.CHECKPOINT, trusted=central_keys, limits=limits
    )  # (1)
    if not signed.ok:
        return Result(None, signed.failures)
    payload = signed.unwrap()
    try:
        checkpoint = Checkpoint.from_wire(payload.value)  # (2)
    except MalformedError as exc:
        return Result.failure(exc)
    named = checkpoint.origin.removeprefix(CENTRAL_ORIGIN_PREFIX)
    if not checkpoint.origin.startswith(CENTRAL_ORIGIN_PREFIX) or named not in payload.signers:
        signers = ", ".join(payload.signers)
        return Result.failure(
            CheckpointError(
                f"checkpoint origin {checkpoint.origin} is not the central log of "
                f"key {signers}, which signed it"
            )
        )  # (3)
    if checkpoint.size == 0:  # (4)
        return Result.failure(
            CheckpointError("a central checkpoint of size 0 covers not even the genesis")
        )
    return Result.success(VerifiedCentralCheckpoint(checkpoint, envelope, payload.payload, named))


verify_central_checkpoint = raising(check_central_checkpoint)


# --- the central log export ------------------------------------------------------


class CentralLogExport(WireModel):
    """The central server's whole log and the checkpoint that covers it."""

    document_name = "central log export"

    format: Literal["msp.central-log-export.v1"]
    exported_at: Timestamp  # the server's clock: metadata
    # entries[i] is entry i: index 0 (the genesis) to n - 1, in order.
    entries: tuple[EntryBase64, ...]
    checkpoint: Envelope  # of size n, signed by the central key


@dataclass(frozen=True, slots=True)
class CentralLogReport:
    """What :func:`check_central_log_export` found.

    ``size`` is the number of entries exported; ``key_id``,
    ``checkpoint_size`` and ``checkpoint_ts`` are the verified checkpoint's
    (None when it did not verify); ``kinds`` counts the entries that parsed,
    by kind. On failure, ``problem`` is the first failure's message and
    ``first_bad_index`` the lowest entry index known to be wrong: the entry
    that does not parse or sits out of place, the first missing entry of a
    truncated tail, the first unsigned entry, or 0 when the checkpoint did
    not verify (no signature vouches for any entry). When the entries do not
    match the checkpoint's root, one checkpoint cannot say which changed:
    ``bad_range`` is then the entries it covers (first, last), and no entry
    is named unless it covers only one.
    """

    exported_at: datetime
    size: int
    key_id: str | None
    checkpoint_size: int | None
    checkpoint_ts: datetime | None
    kinds: dict[str, int]
    first_bad_index: int | None = None
    problem: str | None = None
    bad_range: tuple[int, int] | None = None

    @property
    def verified(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "exported_at": format_time(self.exported_at),
            "size": self.size,
            "key_id": self.key_id,
            "checkpoint_size": self.checkpoint_size,
            "checkpoint_ts": (
                format_time(self.checkpoint_ts) if self.checkpoint_ts is not None else None
            ),
            "kinds": dict(self.kinds),
            "first_bad_index": self.first_bad_index,
            "bad_range": list(self.bad_range) if self.bad_range else None,
            "problem": self.problem,
        }


def build_central_log_export(
    *, exported_at: datetime, entries: Sequence[bytes], checkpoint: Envelope
) -> bytes:
    """The export's canonical JSON bytes (the central server's side).

    ``entries`` are the exact stored bytes of entries 0..n-1 in order and
    ``checkpoint`` the central checkpoint of size n. Nothing is verified
    here: :func:`check_central_log_export` is the judge. Raises
    :class:`ModelError` for pieces of the wrong shape.
    """
    export = CentralLogExport.from_wire(
        {
            "format": CENTRAL_LOG_EXPORT_FORMAT,
            "exported_at": exported_at,
            "entries": [b64encode(raw) for raw in entries],
            "checkpoint": checkpoint,
        }
    )
    return export.canonical_bytes()


def parse_central_log_export(
    data: bytes | dict[str, Any], *, limits: Limits = DEFAULT_LIMITS
) -> CentralLogExport:
    """A central log export from its JSON bytes (parsed strictly, within
    ``limits.max_export_bytes``) or an already-parsed object (whose size the
    caller bounded). Raises :class:`MalformedError`."""
    value = export_value(data, limits)
    export = CentralLogExport.from_wire(value)
    if len(export.entries) > limits.max_export_entries:
        raise ModelError(
            f"central log export: {len(export.entries)} entries, limit {limits.max_export_entries}"
        )
    return export


def check_central_log_export(
    data: bytes | dict[str, Any],
    central_keys: Sequence[VerifyKey],
    *,
    at: datetime | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[CentralLogReport]:
    """Verify a central log export with the central server's public key(s).

    ``at`` is the auditor's time: a checkpoint dated later (beyond the clock
    skew) did not exist then and is refused; None skips that check. The
    result carries the report even when verification failed, except when the
    export does not parse at all.

    Steps, and what each stops:
    (1) the export parses strictly (format tag, duplicate keys, size and
        count bounds) — parser confusion, memory exhaustion;
    (2) the checkpoint is signed by a central key and its origin names that
        key, and it is not dated after ``at`` — a forged checkpoint, an
        appliance's checkpoint of the same root, another log's checkpoint;
    (3) one pass from entry 0: each entry parses strictly at its index, entry
        0 is the ``central.genesis`` naming the key that signed the checkpoint
        and no later entry is another genesis — removed, inserted or
        reordered entries, an appliance's log passed off as the central one;
    (4) the checkpoint's size is the number of entries and its root the root
        of the entries — a truncated tail, an unsigned tail appended after
        the signature, a changed entry.
    """
    if not central_keys:
        raise UsageError("verifying a central log export needs at least one central key")
    try:
        export = parse_central_log_export(data, limits=limits)  # (1)
    except MalformedError as exc:
        return Result.failure(exc)
    failures: list[Failure] = []
    bad: list[int] = []
    checked = check_central_checkpoint(export.checkpoint, central_keys, limits=limits)  # (2)
    verified = checked.value if checked.ok else None
    failures.extend(type(failure)(f"checkpoint: {failure}") for failure in checked.failures)
    if verified is not None and at is not None:
        ts = verified.checkpoint.ts
        if ts > at + limits.clock_skew:
            failures.append(
                CheckpointError(
                    f"checkpoint: dated {format_time(ts)}, after the time of verification "
                    f"{format_time(at)}"
                )
            )
            verified = None

    # Without a verified checkpoint the replay still names bad entries; the
    # genesis must then name one of the central keys.
    key_ids = [verified.key_id] if verified is not None else [k.key_id for k in central_keys]
    replay = CentralLogReplay(key_ids=key_ids, limits=limits)
    kinds: dict[str, int] = {}
    target = verified.checkpoint if verified is not None else None
    size = len(export.entries)
    changed_among: tuple[int, int] | None = None
    try:
        for index, text in enumerate(export.entries):  # (3)
            record = replay.add(b64decode(text, what=f"entry {index}"))
            kinds[record.kind] = kinds.get(record.kind, 0) + 1
            if (
                target is not None
                and target.size == index + 1
                and target.root_bytes != replay.root()
            ):  # (4)
                failures.append(
                    CheckpointError(
                        f"entries 0..{index} do not match the checkpoint of size "
                        f"{target.size}: one of them was changed"
                    )
                )
                if index == 0:
                    bad.append(0)
                else:
                    changed_among = (0, index)
                target = None
    except (MalformedError, VerificationError) as exc:
        failures.append(exc)
        bad.append(replay.size)
    else:
        if size == 0:
            failures.append(LogEntryError("entry 0: the export holds no entries, not even genesis"))
            bad.append(0)
        elif target is not None and target.size > size:  # (4)
            failures.append(
                CheckpointError(
                    f"checkpoint of size {target.size} covers more than the {size} entries "
                    f"exported: the last {target.size - size} entries were removed"
                )
            )
            bad.append(size)
        elif target is not None and target.size < size:
            failures.append(
                UnsignedEntriesError(
                    f"entries {target.size}..{size - 1} are not covered by the checkpoint of "
                    f"size {target.size}: they were added after the last signature"
                )
            )
            bad.append(target.size)
    if verified is None and size and not bad:
        bad.append(0)  # no valid checkpoint vouches for any entry
    report = CentralLogReport(
        exported_at=export.exported_at,
        size=size,
        key_id=verified.key_id if verified is not None else None,
        checkpoint_size=verified.checkpoint.size if verified is not None else None,
        checkpoint_ts=verified.checkpoint.ts if verified is not None else None,
        kinds=dict(sorted(kinds.items())),
        first_bad_index=min(bad) if bad else None,
        problem=failures[0].message if failures else None,
        bad_range=changed_among if not bad else None,
    )
    # The report travels with the failures (Result.unwrap still raises the
    # first one).
    return Result(report, tuple(failures))


verify_central_log_export = raising(check_central_log_export)


# --- one record, for a partner -------------------------------------------------


class CentralRecordProof(WireModel):
    """One entry of the central log and the proof it is in a signed tree."""

    document_name = "central record proof"

    entry: EntryBase64  # the entry's exact canonical bytes
    inclusion: Annotated[tuple[Hash, ...], Field(max_length=63)]  # leaf-side first
    checkpoint: Envelope  # the central checkpoint of the tree the proof leads to


def build_central_record_proof(
    *, entry: bytes, inclusion: Sequence[bytes], checkpoint: Envelope
) -> bytes:
    """The proof's canonical JSON bytes (the central server's side):
    ``entry`` the exact stored bytes of entry i, ``inclusion`` the RFC 6962
    inclusion proof of i in the tree of the checkpoint's size (raw 32-byte
    hashes, leaf-side first). Raises :class:`ModelError` for wrong shapes."""
    proof = CentralRecordProof.from_wire(
        {
            "entry": b64encode(entry),
            "inclusion": [to_hex(node) for node in inclusion],
            "checkpoint": checkpoint,
        }
    )
    return proof.canonical_bytes()


def parse_central_record_proof(
    data: bytes | dict[str, Any], *, limits: Limits = DEFAULT_LIMITS
) -> CentralRecordProof:
    """A record proof from its JSON bytes (strictly parsed) or an
    already-parsed object. Raises :class:`MalformedError`."""
    value = parse_json(data, limits=limits) if isinstance(data, bytes) else data
    return CentralRecordProof.from_wire(value)


@dataclass(frozen=True, slots=True)
class CentralRecordReport:
    """What :func:`check_central_record_proof` found.

    ``entry`` is the record as the proof carries it: proven only when the
    report is ``verified``, shown either way so a failure can say which
    record it was about. ``key_id``, ``checkpoint_size`` and
    ``checkpoint_ts`` are the verified checkpoint's (None when it did not
    verify); ``problem`` is the first failure's message.
    """

    entry: LogEntry
    key_id: str | None
    checkpoint_size: int | None
    checkpoint_ts: datetime | None
    problem: str | None = None

    @property
    def verified(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.entry.index,
            "ts": format_time(self.entry.ts),
            "kind": self.entry.kind,
            "actor": self.entry.actor,
            "data": dict(self.entry.data),
            "key_id": self.key_id,
            "checkpoint_size": self.checkpoint_size,
            "checkpoint_ts": (
                format_time(self.checkpoint_ts) if self.checkpoint_ts is not None else None
            ),
            "problem": self.problem,
        }


def check_central_record_proof(
    proof: CentralRecordProof | bytes | dict[str, Any],
    central_keys: Sequence[VerifyKey],
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[CentralRecordReport]:
    """Verify that one entry is in the central log, as the central key signed it.

    The result carries the report even when verification failed (a tool
    shows which record and which checkpoint it was about), except when the
    proof or its entry does not parse at all.

    (1) the proof parses strictly, the entry is a canonical log entry —
        parser confusion, an entry re-encoded;
    (2) the checkpoint is signed by a central key and its origin names that
        key — a forged or an appliance's checkpoint;
    (3) the entry's leaf hash is included at the entry's own index in the
        tree of the checkpoint's size, with the checkpoint's root — a changed
        entry, an entry moved to another index, a proof for another tree.

    No time is checked: the checkpoint's ``ts`` is reported, not judged
    (docs/protocol.md §9.3).
    """
    if not central_keys:
        raise UsageError("verifying a central record needs at least one central key")
    try:
        parsed = (
            proof
            if isinstance(proof, CentralRecordProof)
            else parse_central_record_proof(proof, limits=limits)
        )  # (1)
        record = parse_entry(b64decode(parsed.entry, what="entry"), limits=limits)
        inclusion = [
            from_hex(node, length=32, what="inclusion proof hash") for node in parsed.inclusion
        ]
    except MalformedError as exc:
        return Result.failure(exc)
    checked = check_central_checkpoint(parsed.checkpoint, central_keys, limits=limits)  # (2)
    if not checked.ok:
        failures = tuple(type(f)(f"checkpoint: {f}") for f in checked.failures)
        unsigned = CentralRecordReport(record.entry, None, None, None, failures[0].message)
        return Result(unsigned, failures)
    verified = checked.unwrap()
    checkpoint = verified.checkpoint
    index = record.entry.index
    included = check_inclusion(  # (3)
        record.leaf_hash, index, checkpoint.size, inclusion, checkpoint.root_bytes, limits=limits
    )
    failures = tuple(type(f)(f"entry {index}: {f}") for f in included.failures)
    report = CentralRecordReport(
        entry=record.entry,
        key_id=verified.key_id,
        checkpoint_size=checkpoint.size,
        checkpoint_ts=checkpoint.ts,
        problem=failures[0].message if failures else None,
    )
    # The report travels with the failures (Result.unwrap still raises the
    # first one).
    return Result(report, failures)


verify_central_record_proof = raising(check_central_record_proof)


def check_central_record(
    proof: CentralRecordProof | bytes | dict[str, Any],
    central_keys: Sequence[VerifyKey],
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[LogEntry]:
    """:func:`check_central_record_proof`, returning the proven entry alone:
    what a caller holding the proof of its own action needs."""
    checked = check_central_record_proof(proof, central_keys, limits=limits)
    if not checked.ok or checked.value is None:
        return Result(None, checked.failures)
    return Result.success(checked.value.entry)


verify_central_record = raising(check_central_record)


__all__ = [
    "CENTRAL_ACTOR",
    "CENTRAL_GENESIS_KIND",
    "CENTRAL_LOG_EXPORT_FORMAT",
    "CentralGenesisData",
    "CentralLogExport",
    "CentralLogReplay",
    "CentralLogReport",
    "CentralRecordProof",
    "CentralRecordReport",
    "VerifiedCentralCheckpoint",
    "build_central_log_export",
    "build_central_record_proof",
    "central_genesis_entry",
    "central_origin",
    "check_central_checkpoint",
    "check_central_genesis",
    "check_central_log_export",
    "check_central_record",
    "check_central_record_proof",
    "make_central_checkpoint",
    "parse_central_log_export",
    "parse_central_record_proof",
    "verify_central_checkpoint",
    "verify_central_log_export",
    "verify_central_record",
    "verify_central_record_proof",
]
