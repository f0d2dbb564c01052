"""The witness's check of an audit batch (check_sync)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from msp_protocol.delegation import (
    Revocation,
    RevocationList,
    Scope,
    VerifiedDelegation,
    issue_delegation,
    verify_delegation,
)
from msp_protocol.keys import SigningKey
from msp_protocol.log import EntryRecord, genesis_entry, make_checkpoint, make_entry
from msp_protocol.merkle import LeafHashTree, TreeState, consistency_proof
from msp_protocol.sync import (
    AlreadyWitnessed,
    SyncAccepted,
    SyncRequest,
    WitnessState,
    check_sync,
    failure_details,
)
from tests.protocol.support import APPLIANCE, NOW, SITE, key

ROOT = key(1)
DEVICE = key(2)
SERIAL = "ab" * 16


def delegation(device: SigningKey = DEVICE, appliance: str = APPLIANCE) -> VerifiedDelegation:
    envelope = issue_delegation(
        ROOT,
        subject=device.verify_key,
        appliance_id=appliance,
        site_id=SITE,
        scopes=[Scope.AUDIT],
        not_before=NOW,
        serial=SERIAL,
    )
    return verify_delegation(envelope, roots=[ROOT.verify_key], at=NOW)


@dataclass
class Appliance:
    """Just enough of an appliance's log to build batches."""

    device: SigningKey = DEVICE
    records: list[EntryRecord] = field(default_factory=list)

    def grow(self, count: int, tag: str = "") -> None:
        for _ in range(count):
            index = len(self.records)
            if index == 0:
                record = genesis_entry(
                    appliance_id=APPLIANCE,
                    key_id=self.device.key_id,
                    certificate_serial=SERIAL,
                    ts=NOW,
                )
            else:
                record = make_entry(
                    index,
                    NOW + timedelta(seconds=index),
                    "l1.action",
                    "agent",
                    {"i": index, "t": tag},
                )
            self.records.append(record)

    def batch(self, old: int, new: int | None = None) -> SyncRequest:
        new = len(self.records) if new is None else new
        leaves = [r.leaf_hash for r in self.records[:new]]
        state = TreeState()
        state.extend(leaves)
        return SyncRequest.build(
            old_size=old,
            entries=[r.raw for r in self.records[old:new]],
            consistency=consistency_proof(old, new, LeafHashTree(leaves)),
            checkpoint=make_checkpoint(self.device, appliance_id=APPLIANCE, state=state, ts=NOW),
        )


@dataclass
class Witness:
    """The server side, as the central server will hold it."""

    state: WitnessState = field(default_factory=WitnessState)
    leaves: list[bytes] = field(default_factory=list)

    def sync(self, request: SyncRequest, cert: VerifiedDelegation | None = None, **kwargs: object):  # type: ignore[no-untyped-def]
        result = check_sync(
            request,
            state=self.state,
            delegation=cert or delegation(),
            stored_leaf=self.leaves.__getitem__,
            **kwargs,  # type: ignore[arg-type]
        )
        if result.ok and isinstance(result.value, SyncAccepted):
            self.state = result.value.state
            self.leaves.extend(r.leaf_hash for r in result.value.records)
        return result


def test_batches_extend_the_witnessed_log() -> None:
    appliance, witness = Appliance(), Witness()
    appliance.grow(10)
    first = witness.sync(appliance.batch(0))
    assert first.ok, first.describe()
    assert witness.state.size == 10
    appliance.grow(25)
    second = witness.sync(appliance.batch(10))
    assert second.ok, second.describe()
    assert witness.state.size == 35
    assert len(witness.leaves) == 35


def test_resending_the_witnessed_checkpoint_is_harmless() -> None:
    appliance, witness = Appliance(), Witness()
    appliance.grow(5)
    request = appliance.batch(0)
    witness.sync(request)
    again = witness.sync(request)
    assert again.ok
    assert isinstance(again.value, AlreadyWitnessed)
    assert len(witness.leaves) == 5


def test_resend_of_held_entries_is_told_where_the_log_ends() -> None:
    appliance, witness = Appliance(), Witness()
    appliance.grow(5)
    witness.sync(appliance.batch(0))
    appliance.grow(5)
    result = witness.sync(appliance.batch(0))  # resends 0..4, which the witness holds
    assert result.codes == ("stale-size",)
    assert failure_details(result.failures[0]) == {"server_size": 5}
    assert len(witness.leaves) == 5


def test_base_beyond_the_witnessed_log_is_stale() -> None:
    appliance, witness = Appliance(), Witness()
    appliance.grow(8)
    witness.sync(appliance.batch(0, 4))
    result = witness.sync(appliance.batch(6))
    assert result.codes == ("stale-size",)
    assert failure_details(result.failures[0]) == {"server_size": 4}


def test_rewrite_of_a_witnessed_entry_is_named() -> None:
    appliance, witness = Appliance(), Witness()
    appliance.grow(6)
    witness.sync(appliance.batch(0))
    appliance.records[3] = make_entry(3, NOW, "l1.action", "agent", {"i": "rewritten"})
    appliance.grow(2)
    result = witness.sync(appliance.batch(0))
    assert result.codes == ("rewrite",)
    assert failure_details(result.failures[0]) == {"index": 3}
    assert "entry 3 differs" in result.describe()


def test_truncated_history_is_refused() -> None:
    appliance, witness = Appliance(), Witness()
    appliance.grow(9)
    witness.sync(appliance.batch(0))
    del appliance.records[6:]
    result = witness.sync(appliance.batch(6, 6))
    assert result.codes == ("truncated-history",)


def test_forked_history_is_refused() -> None:
    """A fork of the witnessed history, at the same size or extending it,
    cannot produce the checkpoint's root from the witnessed tree."""
    honest, witness = Appliance(), Witness()
    honest.grow(4)
    witness.sync(honest.batch(0))
    fork = Appliance(records=list(honest.records))
    fork.records[2] = make_entry(2, NOW, "l1.action", "agent", {"forked": True})

    same_size = witness.sync(fork.batch(4))
    assert same_size.codes == ("bad-checkpoint",)
    assert "checkpoint root at size 4 does not match" in same_size.describe()

    fork.grow(3)
    extended = witness.sync(fork.batch(4))
    assert extended.codes == ("bad-checkpoint",)
    assert witness.state.size == 4


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        pytest.param(
            lambda r: r.model_copy(
                update={"entries": (r.entries[1], r.entries[0], *r.entries[2:])}
            ),
            "bad-log-entry",
            id="reordered_entries",
        ),
        pytest.param(
            lambda r: r.model_copy(update={"entries": r.entries[:-1]}),
            "bad-checkpoint",
            id="missing_entry",
        ),
        pytest.param(
            lambda r: r.model_copy(update={"entries": (*r.entries, r.entries[-1])}),
            "bad-checkpoint",
            id="padded_batch",
        ),
        pytest.param(
            lambda r: r.model_copy(update={"consistency": r.consistency[:-1]}),
            "bad-consistency-proof",
            id="short_proof",
        ),
        pytest.param(
            lambda r: r.model_copy(update={"entries": ("!!!!", *r.entries[1:])}),
            "malformed-encoding",
            id="entry_not_base64",
        ),
    ],
)
def test_bad_batches(mutate, code: str) -> None:  # type: ignore[no-untyped-def]
    appliance, witness = Appliance(), Witness()
    appliance.grow(4)
    witness.sync(appliance.batch(0))
    appliance.grow(6)
    result = witness.sync(mutate(appliance.batch(4)))
    assert result.codes == (code,), result.describe()
    assert witness.state.size == 4


def test_tampered_entry_fails_the_root() -> None:
    appliance, witness = Appliance(), Witness()
    appliance.grow(4)
    request = appliance.batch(0)
    tampered = make_entry(2, NOW + timedelta(seconds=2), "l1.action", "agent", {"i": 2, "t": "x"})
    entries = list(request.entries)
    entries[2] = SyncRequest.build(
        old_size=0, entries=[tampered.raw], consistency=[], checkpoint=request.checkpoint
    ).entries[0]
    result = witness.sync(request.model_copy(update={"entries": tuple(entries)}))
    assert result.codes == ("bad-checkpoint",)
    assert "does not match the entries" in result.describe()


def test_checkpoint_under_another_appliance_certificate_is_refused() -> None:
    appliance, witness = Appliance(), Witness()
    appliance.grow(3)
    other = delegation(appliance="appliance-2")
    assert witness.sync(appliance.batch(0), cert=other).codes == ("wrong-subject",)


def test_batch_signed_past_revocation_cutoff_is_refused() -> None:
    appliance, witness = Appliance(), Witness()
    appliance.grow(6)
    revoked = RevocationList(
        version=1,
        issuer=ROOT.key_id,
        issued_at=NOW,
        revoked=(Revocation(serial=SERIAL, appliance_id=APPLIANCE, cutoff_size=4, revoked_at=NOW),),
    )
    assert witness.sync(appliance.batch(0, 4), revocations=revoked).ok
    result = witness.sync(appliance.batch(4), revocations=revoked)
    assert result.codes == ("certificate-revoked",)


def test_oversized_batch_is_malformed() -> None:
    with pytest.raises(ValueError, match="at most 1000 items"):
        SyncRequest.model_validate(
            {
                "old_size": 0,
                "entries": ["AA=="] * 1001,
                "consistency": [],
                "checkpoint": Appliance().batch(0, 0).checkpoint.to_wire(),
            }
        )


def test_witness_state_round_trips_through_json() -> None:
    appliance, witness = Appliance(), Witness()
    appliance.grow(13)
    witness.sync(appliance.batch(0))
    restored = WitnessState.from_json(witness.state.canonical_bytes())
    assert restored == witness.state
    assert restored.tree().root().hex() == restored.root
