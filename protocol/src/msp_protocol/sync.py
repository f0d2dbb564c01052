"""Audit sync: the appliance's batch and the witness's check of it.

Sync is witnessing. The appliance sends the entries the central server lacks,
the size it believes the server holds, a consistency proof from that size and
a checkpoint of the new size. The server recomputes the tree from its own
state and the entries, checks everything, stores entries and checkpoint
atomically and answers with a receipt (its cosignature).

:func:`check_sync` is that check, pure: the central server calls it with the
state it stored, and so do test doubles of the server. Outcomes:

- :class:`SyncAccepted`: store ``records`` and ``checkpoint``, then sign a
  receipt; ``state`` is the new witness state.
- :class:`AlreadyWitnessed`: the exact checkpoint last cosigned was sent again
  (a retry after a lost answer): return the stored receipt, store nothing.
- :class:`StaleSizeError` (HTTP 409): the appliance's idea of the server's
  size is wrong; it carries the size the server holds.
- :class:`RewriteError`, or any other verification failure (HTTP 422, a
  security alert): the history is not an extension of what was witnessed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, StrictInt, StringConstraints

from msp_protocol.delegation import RevocationList, VerifiedDelegation
from msp_protocol.dsse import Envelope
from msp_protocol.encoding import Hash, b64decode, b64encode, from_hex, to_hex
from msp_protocol.errors import CheckpointError, MalformedError, VerificationError
from msp_protocol.limits import DEFAULT_LIMITS, Limits
from msp_protocol.log import (
    EntryRecord,
    LogReplay,
    VerifiedCheckpoint,
    check_checkpoint,
    check_checkpoint_root,
)
from msp_protocol.merkle import EMPTY_ROOT, TreeState, check_consistency, leaf_hash
from msp_protocol.model import WireModel
from msp_protocol.result import Failure, Result

MAX_BATCH_ENTRIES = 1_000


class StaleSizeError(VerificationError):
    """The batch does not start where the server's log ends."""

    code = "stale-size"

    def __init__(self, message: str, server_size: int) -> None:
        super().__init__(message)
        self.server_size = server_size


class RewriteError(VerificationError):
    """An entry at an index the server already holds differs from what it holds."""

    code = "rewrite"

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class TruncationError(VerificationError):
    """A checkpoint smaller than what was already witnessed: the appliance's
    log lost its tail, or someone is replaying an old state."""

    code = "truncated-history"

    def __init__(self, message: str, server_size: int) -> None:
        super().__init__(message)
        self.server_size = server_size


class SyncRequest(WireModel):
    """The appliance's batch (``POST /api/v1/appliances/{id}/audit/sync``)."""

    document_name = "sync request"

    old_size: Annotated[StrictInt, Field(ge=0, le=2**53 - 1)]
    # Each entry's exact canonical bytes, base64 (standard alphabet, padded).
    entries: Annotated[
        tuple[Annotated[str, StringConstraints(strict=True, max_length=128 * 1024)], ...],
        Field(max_length=MAX_BATCH_ENTRIES),
    ]
    consistency: Annotated[tuple[Hash, ...], Field(max_length=126)]
    checkpoint: Envelope

    @classmethod
    def build(
        cls,
        *,
        old_size: int,
        entries: list[bytes],
        consistency: list[bytes],
        checkpoint: Envelope,
    ) -> SyncRequest:
        return cls(
            old_size=old_size,
            entries=tuple(b64encode(raw) for raw in entries),
            consistency=tuple(to_hex(node) for node in consistency),
            checkpoint=checkpoint,
        )

    def entry_bytes(self) -> list[bytes]:
        return [
            b64decode(text, what=f"entry {self.old_size + i}")
            for i, text in enumerate(self.entries)
        ]


class SyncResponse(WireModel):
    """The server's answer to an accepted (or already witnessed) batch."""

    document_name = "sync response"

    size: Annotated[StrictInt, Field(ge=0)]
    receipt: Envelope


class WitnessState(WireModel):
    """What the witness keeps per appliance log: the size and root it last
    cosigned, the compact range at that size (to extend the tree without
    re-reading entries), and the digest of the checkpoint it cosigned."""

    document_name = "witness state"

    size: Annotated[StrictInt, Field(ge=0)] = 0
    root: Hash = EMPTY_ROOT.hex()
    nodes: tuple[Hash, ...] = ()
    checkpoint_sha256: Hash | None = None

    def tree(self) -> TreeState:
        return TreeState(self.size, [from_hex(node, length=32) for node in self.nodes])

    @classmethod
    def of(cls, tree: TreeState, checkpoint_sha256: str | None) -> WitnessState:
        return cls(
            size=tree.size,
            root=to_hex(tree.root()),
            nodes=tuple(to_hex(node) for node in tree.nodes),
            checkpoint_sha256=checkpoint_sha256,
        )


@dataclass(frozen=True, slots=True)
class SyncAccepted:
    state: WitnessState
    records: list[EntryRecord]
    checkpoint: VerifiedCheckpoint


@dataclass(frozen=True, slots=True)
class AlreadyWitnessed:
    state: WitnessState


SyncOutcome = SyncAccepted | AlreadyWitnessed


def check_sync(
    request: SyncRequest,
    *,
    state: WitnessState,
    delegation: VerifiedDelegation,
    stored_leaf: Callable[[int], bytes],
    revocations: RevocationList | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[SyncOutcome]:
    """Check one batch against the witness state.

    ``delegation`` is the verified certificate of the key that signed the
    checkpoint (the caller picks it by the envelope's key id and decides what
    to do with an expired one). ``stored_leaf(i)`` returns the leaf hash the
    witness holds at index ``i`` (only asked for ``i < state.size``).

    (1) the checkpoint verifies under the certificate — forgery, another
        appliance's checkpoint, a key past its revocation cutoff;
    (2) the exact checkpoint already cosigned is a harmless retry;
    (3) entries sent for indices the witness holds are compared with what it
        holds: one that differs is a rewrite; equal ones are a resend, and the
        appliance is told where the witness's log ends — history rewritten
        after it was witnessed; duplicates;
    (4) the checkpoint is not smaller than the witnessed size — a log whose
        tail was cut off; ``old_size`` is where the witness's log ends — a
        stale or invented base;
    (5) the batch holds exactly the entries between the two sizes, within
        bounds — gaps, padding, oversized batches;
    (6) each entry parses strictly at its index, and the tree they extend the
        witnessed one into has the checkpoint's root — tampered, reordered,
        inserted or missing entries;
    (7) the consistency proof from the witnessed (size, root) to the new one
        holds — a fork: same size, different history.
    """
    try:
        return _check_sync(request, state, delegation, stored_leaf, revocations, limits)
    except (MalformedError, VerificationError) as exc:
        return Result.failure(exc)


def _check_sync(
    request: SyncRequest,
    state: WitnessState,
    delegation: VerifiedDelegation,
    stored_leaf: Callable[[int], bytes],
    revocations: RevocationList | None,
    limits: Limits,
) -> Result[SyncOutcome]:
    verified = check_checkpoint(
        request.checkpoint, delegation=delegation, revocations=revocations, limits=limits
    )  # (1)
    if not verified.ok:
        return Result(None, verified.failures)
    checkpoint = verified.unwrap()
    new_size = checkpoint.checkpoint.size

    if checkpoint.digest == state.checkpoint_sha256:  # (2)
        return Result.success(AlreadyWitnessed(state))

    entries = request.entry_bytes()
    overlap = min(state.size, request.old_size + len(entries))
    for index in range(request.old_size, overlap):  # (3)
        if leaf_hash(entries[index - request.old_size]) != stored_leaf(index):
            raise RewriteError(
                f"entry {index} differs from the entry witnessed at that index", index
            )
    if new_size < state.size:
        raise TruncationError(
            f"checkpoint of size {new_size} is smaller than the witnessed size {state.size}",
            state.size,
        )
    if request.old_size != state.size:  # (4)
        raise StaleSizeError(
            f"batch starts at {request.old_size}, the witnessed log has {state.size} entries",
            state.size,
        )
    if len(entries) != new_size - state.size:  # (5)
        raise CheckpointError(
            f"batch has {len(entries)} entries, the checkpoint needs {new_size - state.size}"
        )
    if len(entries) > MAX_BATCH_ENTRIES:
        raise MalformedError(f"batch of {len(entries)} entries exceeds {MAX_BATCH_ENTRIES}")

    replay = LogReplay(
        appliance_id=checkpoint.checkpoint.appliance_id, state=state.tree(), limits=limits
    )  # (6)
    records = [replay.add(raw) for raw in entries]
    root_check = check_checkpoint_root(checkpoint.checkpoint, replay)
    if not root_check.ok:
        return Result(None, root_check.failures)

    proof = [
        from_hex(node, length=32, what="consistency proof hash") for node in request.consistency
    ]
    consistent = check_consistency(  # (7)
        state.size,
        new_size,
        from_hex(state.root, length=32),
        checkpoint.checkpoint.root_bytes,
        proof,
        limits=limits,
    )
    if not consistent.ok:
        return Result(None, consistent.failures)
    new_state = WitnessState.of(replay.state, checkpoint.digest)
    return Result.success(SyncAccepted(new_state, records, checkpoint))


def failure_details(failure: Failure) -> dict[str, Any]:
    """Extra fields a problem document carries for a sync failure."""
    if isinstance(failure, StaleSizeError | TruncationError):
        return {"server_size": failure.server_size}
    if isinstance(failure, RewriteError):
        return {"index": failure.index}
    return {}


__all__ = [
    "AlreadyWitnessed",
    "RewriteError",
    "StaleSizeError",
    "SyncAccepted",
    "SyncOutcome",
    "SyncRequest",
    "SyncResponse",
    "TruncationError",
    "WitnessState",
    "check_sync",
    "failure_details",
]
