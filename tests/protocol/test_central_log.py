"""The central server's own audit log: its checkpoints, its export (verified
offline with only the central public key) and single-record proofs for
partners.

Real keys throughout; each attack is a fixture named after it and must fail
with its own code, message and first bad entry.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msp_protocol.canonical import canonicalize
from msp_protocol.central_log import (
    CENTRAL_GENESIS_KIND,
    CENTRAL_LOG_EXPORT_FORMAT,
    CentralLogReplay,
    build_central_log_export,
    build_central_record_proof,
    central_genesis_entry,
    central_origin,
    check_central_checkpoint,
    check_central_log_export,
    check_central_record,
    check_central_record_proof,
    make_central_checkpoint,
    parse_central_log_export,
    parse_central_record_proof,
    verify_central_checkpoint,
    verify_central_log_export,
    verify_central_record,
    verify_central_record_proof,
)
from msp_protocol.delegation import VerifiedDelegation
from msp_protocol.dsse import Envelope, PayloadType, sign_document, sign_envelope
from msp_protocol.encoding import b64encode
from msp_protocol.errors import (
    LogEntryError,
    UsageError,
)
from msp_protocol.limits import Limits
from msp_protocol.log import (
    Checkpoint,
    LogReplay,
    check_checkpoint,
    genesis_entry,
    make_checkpoint,
    make_entry,
    make_receipt,
)
from msp_protocol.merkle import LeafHashTree, TreeState, inclusion_proof, leaf_hash
from msp_protocol.verify_cli import RECORD_PROOF_MEMBERS, main
from tests.protocol.support import APPLIANCE, NOW, key

ROOT = key(1)  # the central root key
DEVICE = key(2)  # an appliance's device key, certified by ROOT (conftest)
OTHER_ROOT = key(7)
CENTRAL = [ROOT.verify_key]
SIZE = 12
ACTIONS = (
    ("settings.changed", "admin", {"setting": "retention_days", "value": 400}),
    ("enrollment.token_created", "partner:p-1", {"site_id": "site-clinic-1"}),
    ("certificate.revoked", "partner:p-1", {"serial": "ab" * 16, "cutoff_size": 40}),
    ("escalation.acknowledged", "user:u-7", {"escalation_id": "esc-3"}),
    ("evidence.attached", "partner:p-2", {"site_id": "site-2", "sha256": "cd" * 32}),
)


def at_minute(index: int) -> datetime:
    return NOW + timedelta(minutes=index)


def action(index: int) -> bytes:
    kind, actor, data = ACTIONS[(index - 1) % len(ACTIONS)]
    return make_entry(index, at_minute(index), kind, actor, {**data, "n": index}).raw


def central_entries(size: int = SIZE, *, signer_id: str = ROOT.key_id) -> list[bytes]:
    entries = [central_genesis_entry(signer_id, at_minute(0)).raw]
    entries.extend(action(index) for index in range(1, size))
    return entries


def state_of(entries: list[bytes]) -> TreeState:
    replay = CentralLogReplay(key_ids=[ROOT.key_id, OTHER_ROOT.key_id])
    replay.extend(entries)
    return replay.state


def checkpoint_of(entries: list[bytes], size: int | None = None) -> Envelope:
    cut = entries if size is None else entries[:size]
    return make_central_checkpoint(ROOT, state_of(cut), at_minute(len(cut)))


@dataclass
class Export:
    entries: list[bytes]
    checkpoint: Envelope

    def build(self) -> bytes:
        return build_central_log_export(
            exported_at=NOW + timedelta(days=1), entries=self.entries, checkpoint=self.checkpoint
        )


def good() -> Export:
    entries = central_entries()
    return Export(entries, checkpoint_of(entries))


def unsigned_checkpoint(origin: str, entries: list[bytes]) -> Checkpoint:
    state = state_of(entries)
    return Checkpoint(origin=origin, size=state.size, root=state.root().hex(), ts=NOW)


# --- a good log ----------------------------------------------------------------------


def test_good_export_verifies() -> None:
    data = good().build()
    report = verify_central_log_export(data, CENTRAL, at=NOW + timedelta(days=2))
    assert report.verified
    assert (report.size, report.checkpoint_size, report.key_id) == (SIZE, SIZE, ROOT.key_id)
    assert report.checkpoint_ts == at_minute(SIZE)
    assert report.kinds == {
        "central.genesis": 1,
        "certificate.revoked": 2,
        "enrollment.token_created": 2,
        "escalation.acknowledged": 2,
        "evidence.attached": 2,
        "settings.changed": 3,
    }
    assert (report.first_bad_index, report.problem) == (None, None)
    value = json.loads(data)
    assert value["format"] == CENTRAL_LOG_EXPORT_FORMAT
    assert canonicalize(value) == data
    assert len(parse_central_log_export(data).entries) == SIZE


def test_genesis_entry_names_the_key() -> None:
    record = central_genesis_entry(ROOT.verify_key, NOW)
    assert record == central_genesis_entry(ROOT.key_id, NOW)
    entry = record.entry
    assert (entry.index, entry.kind, entry.actor) == (0, CENTRAL_GENESIS_KIND, "central")
    assert entry.data == {"key_id": ROOT.key_id}
    with pytest.raises(UsageError, match="central key id"):
        central_genesis_entry("not-a-key-id", NOW)


def test_central_origin() -> None:
    assert central_origin(ROOT.key_id) == f"msp-central/{ROOT.key_id}"
    with pytest.raises(UsageError):
        central_origin("ABCDEF0123456789")


def test_central_checkpoint_verifies() -> None:
    entries = central_entries()
    verified = verify_central_checkpoint(checkpoint_of(entries), CENTRAL)
    assert verified.key_id == ROOT.key_id
    assert verified.checkpoint.origin == f"msp-central/{ROOT.key_id}"
    assert verified.checkpoint.root_bytes == state_of(entries).root()
    with pytest.raises(UsageError, match="not of an appliance's log"):
        _ = verified.checkpoint.appliance_id


def test_empty_central_checkpoint_is_refused() -> None:
    with pytest.raises(UsageError):
        make_central_checkpoint(ROOT, TreeState(), NOW)
    forged = sign_document(
        PayloadType.CHECKPOINT, unsigned_checkpoint(central_origin(ROOT.key_id), []), [ROOT]
    )
    assert check_central_checkpoint(forged, CENTRAL).codes == ("bad-checkpoint",)


def test_no_central_key_is_a_usage_error() -> None:
    export = good()
    with pytest.raises(UsageError):
        check_central_log_export(export.build(), [])
    with pytest.raises(UsageError):
        check_central_checkpoint(export.checkpoint, [])
    with pytest.raises(UsageError):
        CentralLogReplay(key_ids=[])


# --- one kind of checkpoint never passes for the other ------------------------------


def test_device_checkpoint_is_not_central(delegation: VerifiedDelegation) -> None:
    entries = central_entries()
    device = make_checkpoint(DEVICE, appliance_id=APPLIANCE, state=state_of(entries), ts=NOW)
    result = check_central_checkpoint(device, CENTRAL)
    assert result.codes == ("bad-signature",)
    assert f"key {DEVICE.key_id} is not trusted" in result.describe()
    # Even the central key's own signature over an appliance origin is refused.
    central_signed = sign_document(
        PayloadType.CHECKPOINT, unsigned_checkpoint(f"msp/{APPLIANCE}", entries), [ROOT]
    )
    result = check_central_checkpoint(central_signed, CENTRAL)
    assert result.codes == ("bad-checkpoint",)
    assert f"origin msp/{APPLIANCE} is not the central log of key {ROOT.key_id}" in str(
        result.failures[0]
    )


def test_central_checkpoint_is_not_a_device_one(delegation: VerifiedDelegation) -> None:
    central = checkpoint_of(central_entries())
    result = check_checkpoint(central, delegation=delegation)
    assert result.codes == ("bad-signature",)
    # A device key signing a central origin: refused by the appliance check
    # (wrong subject) and by the central one (untrusted signer).
    device_signed = sign_document(
        PayloadType.CHECKPOINT,
        unsigned_checkpoint(central_origin(DEVICE.key_id), central_entries()),
        [DEVICE],
    )
    assert check_checkpoint(device_signed, delegation=delegation).codes == ("wrong-subject",)
    assert check_central_checkpoint(device_signed, CENTRAL).codes == ("bad-signature",)


def test_receipts_stay_appliance_only(delegation: VerifiedDelegation) -> None:
    central = verify_central_checkpoint(checkpoint_of(central_entries()), CENTRAL)
    device = check_checkpoint(
        make_checkpoint(DEVICE, appliance_id=APPLIANCE, state=state_of(central_entries()), ts=NOW),
        delegation=delegation,
    ).unwrap()
    make_receipt(ROOT, device, NOW)  # the appliance's receipt still builds
    as_device = replace(device, checkpoint=central.checkpoint)
    # Receipts cosign appliance checkpoints only: a central origin does not fit.
    with pytest.raises(ValueError, match="origin"):
        make_receipt(ROOT, as_device, NOW)


def test_each_log_refuses_a_second_genesis_of_its_own_kind() -> None:
    appliance = LogReplay(appliance_id=APPLIANCE)
    appliance.add(
        genesis_entry(
            appliance_id=APPLIANCE, key_id=DEVICE.key_id, certificate_serial="ab" * 16, ts=NOW
        ).raw
    )
    second = make_entry(1, NOW, "chain.genesis", "agent", {}).raw
    with pytest.raises(LogEntryError, match=r"^entry 1: a second chain\.genesis$"):
        appliance.add(second)
    central = CentralLogReplay(key_ids=[ROOT.key_id])
    central.add(central_genesis_entry(ROOT.key_id, NOW).raw)
    with pytest.raises(LogEntryError, match=r"^entry 1: a second central\.genesis$"):
        central.add(make_entry(1, NOW, CENTRAL_GENESIS_KIND, "admin", {}).raw)
    assert central.central_genesis is not None
    assert central.central_genesis.key_id == ROOT.key_id


# --- attacks on the export ---------------------------------------------------------


def tamper_entry(export: Export) -> Export:
    changed = export.entries[6].replace(b'"n":6', b'"n":7')
    assert changed != export.entries[6]
    return replace(export, entries=[*export.entries[:6], changed, *export.entries[7:]])


def drop_entry(export: Export) -> Export:
    return replace(export, entries=[*export.entries[:6], *export.entries[7:]])


def reorder_entries(export: Export) -> Export:
    entries = list(export.entries)
    entries[6], entries[7] = entries[7], entries[6]
    return replace(export, entries=entries)


def truncate_tail(export: Export) -> Export:
    return replace(export, entries=export.entries[:9])


def unsigned_tail(export: Export) -> Export:
    return replace(export, entries=[*export.entries, action(SIZE), action(SIZE + 1)])


def wrong_genesis(export: Export) -> Export:
    # An appliance's genesis at 0, and a checkpoint the central key signed of it.
    appliance = genesis_entry(
        appliance_id=APPLIANCE, key_id=ROOT.key_id, certificate_serial="ab" * 16, ts=NOW
    ).raw
    entries = [appliance, *export.entries[1:]]
    state = TreeState()
    state.extend([leaf_hash(raw) for raw in entries])
    return Export(entries, make_central_checkpoint(ROOT, state, NOW))


def genesis_names_other_key(export: Export) -> Export:
    entries = central_entries(signer_id=OTHER_ROOT.key_id)
    return Export(entries, checkpoint_of(entries))


def checkpoint_by_device_key(export: Export) -> Export:
    device = make_checkpoint(DEVICE, appliance_id=APPLIANCE, state=state_of(export.entries), ts=NOW)
    return replace(export, checkpoint=device)


def checkpoint_other_origin(export: Export) -> Export:
    # The central key signed it, but for the log of another central key.
    other = unsigned_checkpoint(central_origin(OTHER_ROOT.key_id), export.entries)
    return replace(export, checkpoint=sign_document(PayloadType.CHECKPOINT, other, [ROOT]))


def forged_checkpoint_signature(export: Export) -> Export:
    genuine = export.checkpoint
    forged = sign_envelope(PayloadType.CHECKPOINT, genuine.payload_bytes(), [OTHER_ROOT])
    signature = forged.signatures[0].model_copy(update={"keyid": ROOT.key_id})
    return replace(export, checkpoint=forged.model_copy(update={"signatures": (signature,)}))


def checkpoint_from_the_future(export: Export) -> Export:
    future = make_central_checkpoint(ROOT, state_of(export.entries), NOW + timedelta(days=30))
    return replace(export, checkpoint=future)


ATTACKS: list[tuple[Callable[[Export], Export], tuple[str, ...], int | None, str]] = [
    (
        tamper_entry,
        ("bad-checkpoint",),
        None,  # one checkpoint over 0..11 cannot say which entry: see bad_range
        "entries 0..11 do not match the checkpoint of size 12: one of them was changed",
    ),
    (drop_entry, ("bad-log-entry",), 6, "entry 6: carries index 7"),
    (reorder_entries, ("bad-log-entry",), 6, "entry 6: carries index 7"),
    (
        truncate_tail,
        ("bad-checkpoint",),
        9,
        "checkpoint of size 12 covers more than the 9 entries exported: "
        "the last 3 entries were removed",
    ),
    (
        unsigned_tail,
        ("unsigned-entries",),
        12,
        "entries 12..13 are not covered by the checkpoint of size 12: "
        "they were added after the last signature",
    ),
    (
        wrong_genesis,
        ("bad-log-entry",),
        0,
        "entry 0: kind is chain.genesis, expected central.genesis",
    ),
    (
        genesis_names_other_key,
        ("bad-log-entry",),
        0,
        f"entry 0: genesis of the central log of key {OTHER_ROOT.key_id}, "
        f"expected key {ROOT.key_id}",
    ),
    (
        checkpoint_by_device_key,
        ("bad-signature",),
        0,
        f"checkpoint: 0 of 1 required signatures by trusted keys (key {DEVICE.key_id} "
        "is not trusted)",
    ),
    (
        checkpoint_other_origin,
        ("bad-checkpoint",),
        0,
        f"checkpoint: checkpoint origin msp-central/{OTHER_ROOT.key_id} is not the central "
        f"log of key {ROOT.key_id}, which signed it",
    ),
    (
        forged_checkpoint_signature,
        ("bad-signature",),
        0,
        f"checkpoint: 0 of 1 required signatures by trusted keys (signature does not "
        f"verify under key {ROOT.key_id})",
    ),
    (
        checkpoint_from_the_future,
        ("bad-checkpoint",),
        0,
        "checkpoint: dated 2026-12-25T12:00:00Z, after the time of verification "
        "2026-11-27T12:00:00Z",
    ),
]


@pytest.mark.parametrize(
    ("attack", "codes", "first_bad_index", "message"),
    [pytest.param(*case, id=case[0].__name__) for case in ATTACKS],
)
def test_attack_is_refused(
    attack: Callable[[Export], Export],
    codes: tuple[str, ...],
    first_bad_index: int | None,
    message: str,
) -> None:
    data = attack(good()).build()
    at = NOW + timedelta(days=2)
    result = check_central_log_export(data, CENTRAL, at=at)
    assert result.codes == codes, result.describe()
    assert str(result.failures[0]) == message
    report = result.value
    assert report is not None
    assert not report.verified
    assert report.first_bad_index == first_bad_index
    assert report.problem == message
    with pytest.raises(type(result.failures[0])):
        verify_central_log_export(data, CENTRAL, at=at)


def test_the_future_checkpoint_passes_without_a_time() -> None:
    data = checkpoint_from_the_future(good()).build()
    assert check_central_log_export(data, CENTRAL).ok


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        pytest.param(
            {"format": "msp.central-log-export.v2"},
            "malformed-document",
            "format",
            id="unknown_format",
        ),
        pytest.param({"extra": 1}, "malformed-document", "extra", id="unknown_field"),
        pytest.param(
            {"entries": ["not base64!"]}, "malformed-encoding", "entry 0", id="entry_not_base64"
        ),
        pytest.param(
            {"entries": []}, "bad-log-entry", "the export holds no entries", id="no_entries"
        ),
    ],
)
def test_malformed_exports(change: dict[str, object], code: str, message: str) -> None:
    value = json.loads(good().build())
    value.update(change)
    result = check_central_log_export(canonicalize(value), CENTRAL)
    assert result.codes[0] == code
    assert message in str(result.failures[0])


def test_duplicate_keys_are_refused() -> None:
    data = good().build()
    duplicated = data[:-1] + b',"format":"msp.central-log-export.v1"}'
    assert check_central_log_export(duplicated, CENTRAL).codes == ("malformed-json",)


def test_export_bounds_come_from_limits() -> None:
    data = good().build()
    assert check_central_log_export(
        data, CENTRAL, limits=Limits(max_export_bytes=len(data) - 1)
    ).codes == ("malformed-json",)
    result = check_central_log_export(data, CENTRAL, limits=Limits(max_export_entries=SIZE - 1))
    assert result.codes == ("malformed-document",)
    assert "12 entries, limit 11" in str(result.failures[0])


PROPERTY_EXPORT = good()


@settings(max_examples=60)
@given(st.data())
def test_any_single_byte_change_of_an_entry_fails(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, SIZE - 1), label="entry")
    raw = PROPERTY_EXPORT.entries[index]
    position = data.draw(st.integers(0, len(raw) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda b: b != raw[position]), label="byte")
    changed = raw[:position] + bytes([value]) + raw[position + 1 :]
    entries = [*PROPERTY_EXPORT.entries[:index], changed, *PROPERTY_EXPORT.entries[index + 1 :]]
    result = check_central_log_export(replace(PROPERTY_EXPORT, entries=entries).build(), CENTRAL)
    assert not result.ok
    assert result.value is not None
    # The changed entry is named, or else the range that holds it: never an
    # entry that may be untouched.
    report = result.value
    if report.first_bad_index is not None:
        assert report.first_bad_index == index
    else:
        assert report.bad_range is not None
        assert report.bad_range[0] <= index <= report.bad_range[1]


# --- record proofs for partners ------------------------------------------------------


@dataclass
class RecordProof:
    entry: bytes
    inclusion: list[bytes]
    checkpoint: Envelope

    def build(self) -> bytes:
        return build_central_record_proof(
            entry=self.entry, inclusion=self.inclusion, checkpoint=self.checkpoint
        )


def record_proof(index: int, *, proof_size: int = SIZE) -> RecordProof:
    """Entry ``index`` of the good log, proven in the tree of ``proof_size``
    under the checkpoint of the whole log."""
    entries = central_entries()
    tree = LeafHashTree([leaf_hash(raw) for raw in entries[:proof_size]])
    return RecordProof(
        entries[index], inclusion_proof(index, proof_size, tree), checkpoint_of(entries)
    )


@pytest.mark.parametrize("index", [0, 1, 5, SIZE - 1])
def test_record_proof_verifies(index: int) -> None:
    data = record_proof(index).build()
    entry = verify_central_record(data, CENTRAL)
    assert entry.index == index
    assert entry == verify_central_record(parse_central_record_proof(data), CENTRAL)
    assert entry == verify_central_record(json.loads(data), CENTRAL)
    if index:
        assert (entry.kind, entry.actor) == ACTIONS[(index - 1) % len(ACTIONS)][:2]
    else:
        assert entry.kind == CENTRAL_GENESIS_KIND


def record_wrong_index(proof: RecordProof) -> RecordProof:
    # Entry 4, with the path of entry 3.
    return replace(proof, inclusion=record_proof(3).inclusion)


def record_tampered_entry(proof: RecordProof) -> RecordProof:
    return replace(proof, entry=proof.entry.replace(b'"n":4', b'"n":5'))


def record_entry_beyond_the_tree(proof: RecordProof) -> RecordProof:
    return replace(proof, entry=action(SIZE))


def record_proof_for_another_size(proof: RecordProof) -> RecordProof:
    return record_proof(4, proof_size=10)


def record_checkpoint_by_device_key(proof: RecordProof) -> RecordProof:
    device = make_checkpoint(
        DEVICE, appliance_id=APPLIANCE, state=state_of(central_entries()), ts=NOW
    )
    return replace(proof, checkpoint=device)


def record_checkpoint_by_other_central_key(proof: RecordProof) -> RecordProof:
    entries = central_entries(signer_id=OTHER_ROOT.key_id)
    other = make_central_checkpoint(OTHER_ROOT, state_of(entries), NOW)
    return replace(proof, checkpoint=other)


RECORD_ATTACKS: list[tuple[Callable[[RecordProof], RecordProof], str, str]] = [
    (
        record_wrong_index,
        "bad-inclusion-proof",
        "entry 4: inclusion proof does not lead to the root of size 12",
    ),
    (
        record_tampered_entry,
        "bad-inclusion-proof",
        "entry 4: inclusion proof does not lead to the root of size 12",
    ),
    (
        record_entry_beyond_the_tree,
        "bad-inclusion-proof",
        "entry 12: leaf index 12 outside a tree of size 12",
    ),
    (
        record_proof_for_another_size,
        "bad-inclusion-proof",
        "entry 4: inclusion proof does not lead to the root of size 12",
    ),
    (
        record_checkpoint_by_device_key,
        "bad-signature",
        f"checkpoint: 0 of 1 required signatures by trusted keys (key {DEVICE.key_id} "
        "is not trusted)",
    ),
    (
        record_checkpoint_by_other_central_key,
        "bad-signature",
        f"checkpoint: 0 of 1 required signatures by trusted keys (key {OTHER_ROOT.key_id} "
        "is not trusted)",
    ),
]


@pytest.mark.parametrize(
    ("attack", "code", "message"),
    [pytest.param(*case, id=case[0].__name__) for case in RECORD_ATTACKS],
)
def test_record_attack_is_refused(
    attack: Callable[[RecordProof], RecordProof], code: str, message: str
) -> None:
    data = attack(record_proof(4)).build()
    result = check_central_record(data, CENTRAL)
    assert result.codes == (code,), result.describe()
    assert str(result.failures[0]) == message
    with pytest.raises(type(result.failures[0])):
        verify_central_record(data, CENTRAL)


def test_record_proof_refuses_a_non_canonical_entry() -> None:
    proof = record_proof(4)
    spaced = proof.entry.replace(b'"n":4', b'"n": 4')
    result = check_central_record(replace(proof, entry=spaced).build(), CENTRAL)
    assert result.codes == ("malformed-json",)


def test_record_proof_is_strict() -> None:
    value = json.loads(record_proof(4).build())
    value["index"] = 4
    assert check_central_record(value, CENTRAL).codes == ("malformed-document",)
    value = json.loads(record_proof(4).build())
    value["entry"] = b64encode(b"{}") + "="
    assert check_central_record(value, CENTRAL).codes == ("malformed-encoding",)
    with pytest.raises(UsageError):
        check_central_record(value, [])


# --- msp-verify ------------------------------------------------------------------

KEY = ["--central-key", ROOT.verify_key.hex, "--at", "2026-11-27T12:00:00Z"]


def run_main(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str], list[str]]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err.splitlines()


@pytest.fixture
def central_files(tmp_path: Path) -> dict[str, Path]:
    paths = {"good": tmp_path / "central-log.json", "bad": tmp_path / "truncate_tail.json"}
    paths["good"].write_bytes(good().build())
    paths["bad"].write_bytes(truncate_tail(good()).build())
    return paths


def test_cli_verifies_a_central_log_export(
    central_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_main([*KEY, str(central_files["good"])], capsys)
    assert (status, err) == (0, [])
    assert out == [
        f"central log export of key {ROOT.key_id}: verified",
        "  12 entries, all covered by the checkpoint the central key signed at "
        "2026-11-25T12:12:00Z",
        "  by kind: central.genesis 1, certificate.revoked 2, enrollment.token_created 2, "
        "escalation.acknowledged 2, evidence.attached 2, settings.changed 3",
    ]
    status, out, _ = run_main([*KEY, "--json", str(central_files["good"])], capsys)
    assert status == 0
    report = json.loads("\n".join(out))
    assert (report["kind"], report["verified"]) == ("central-log-export", True)
    assert report["report"]["size"] == SIZE
    assert report["report"]["key_id"] == ROOT.key_id
    assert report["report"]["checkpoint_ts"] == "2026-11-25T12:12:00Z"
    assert report["report"]["kinds"]["settings.changed"] == 3


def test_cli_names_the_failure_of_a_central_log_export(
    central_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    message = (
        "checkpoint of size 12 covers more than the 9 entries exported: "
        "the last 3 entries were removed"
    )
    status, out, _ = run_main([*KEY, str(central_files["bad"])], capsys)
    assert status == 1
    assert out == [
        f"central log export of key {ROOT.key_id}: NOT VERIFIED (first bad entry: 9)",
        f"  bad-checkpoint: {message}",
    ]
    status, out, _ = run_main([*KEY, "--json", str(central_files["bad"])], capsys)
    assert status == 1
    report = json.loads("\n".join(out))
    assert report["verified"] is False
    assert report["report"]["first_bad_index"] == 9
    assert report["problems"] == [{"code": "bad-checkpoint", "message": message}]


def test_cli_refuses_a_central_log_under_another_key(
    central_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--central-key", OTHER_ROOT.verify_key.hex, str(central_files["good"])]
    status, out, _ = run_main(argv, capsys)
    assert status == 1
    assert out[0] == "central log export: NOT VERIFIED (first bad entry: 0)"
    assert out[1].startswith("  bad-signature: checkpoint: 0 of 1 required signatures")


# --- msp-verify on a record proof ----------------------------------------------------


def record_changed_proof_hash(proof: RecordProof) -> RecordProof:
    first = bytes([proof.inclusion[0][0] ^ 1]) + proof.inclusion[0][1:]
    return replace(proof, inclusion=[first, *proof.inclusion[1:]])


def record_file(tmp_path: Path, proof: RecordProof, name: str = "record-proof.json") -> Path:
    path = tmp_path / name
    path.write_bytes(proof.build())
    return path


def test_cli_verifies_a_central_record_proof(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = record_file(tmp_path, record_proof(4))
    status, out, err = run_main([*KEY, str(path)], capsys)
    assert (status, err) == (0, [])
    assert out == [
        f"central record proof of key {ROOT.key_id}: verified",
        "  entry 4, included in the log of 12 entries the central key signed at "
        "2026-11-25T12:12:00Z",
        "  escalation.acknowledged by user:u-7 at 2026-11-25T12:04:00Z",
        '  data: {"escalation_id":"esc-3","n":4}',
    ]
    status, out, _ = run_main([*KEY, "--json", str(path)], capsys)
    assert status == 0
    assert json.loads("\n".join(out)) == {
        "file": str(path),
        "kind": "central-record-proof",
        "verified": True,
        "report": {
            "index": 4,
            "ts": "2026-11-25T12:04:00Z",
            "kind": "escalation.acknowledged",
            "actor": "user:u-7",
            "data": {"escalation_id": "esc-3", "n": 4},
            "key_id": ROOT.key_id,
            "checkpoint_size": SIZE,
            "checkpoint_ts": "2026-11-25T12:12:00Z",
            "problem": None,
        },
        "problems": [],
    }


def test_cli_shows_the_genesis_of_a_record_proof_of_entry_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run_main([*KEY, str(record_file(tmp_path, record_proof(0)))], capsys)
    assert status == 0
    assert out[1:] == [
        "  entry 0, included in the log of 12 entries the central key signed at "
        "2026-11-25T12:12:00Z",
        "  central.genesis by central at 2026-11-25T12:00:00Z",
        f'  data: {{"key_id":"{ROOT.key_id}"}}',
    ]


NOT_LEADING = "entry 4: inclusion proof does not lead to the root of size 12"


@pytest.mark.parametrize(
    ("attack", "lines"),
    [
        pytest.param(
            record_tampered_entry,
            [
                f"central record proof of key {ROOT.key_id}: NOT VERIFIED",
                f"  bad-inclusion-proof: {NOT_LEADING}",
            ],
            id="record_tampered_entry",
        ),
        pytest.param(
            record_changed_proof_hash,
            [
                f"central record proof of key {ROOT.key_id}: NOT VERIFIED",
                f"  bad-inclusion-proof: {NOT_LEADING}",
            ],
            id="record_changed_proof_hash",
        ),
        pytest.param(
            record_checkpoint_by_other_central_key,
            [
                "central record proof: NOT VERIFIED",
                "  bad-signature: checkpoint: 0 of 1 required signatures by trusted keys "
                f"(key {OTHER_ROOT.key_id} is not trusted)",
            ],
            id="record_checkpoint_by_other_central_key",
        ),
        pytest.param(
            record_wrong_index,
            [
                f"central record proof of key {ROOT.key_id}: NOT VERIFIED",
                f"  bad-inclusion-proof: {NOT_LEADING}",
            ],
            id="record_wrong_index",
        ),
        pytest.param(
            record_entry_beyond_the_tree,
            [
                f"central record proof of key {ROOT.key_id}: NOT VERIFIED",
                "  bad-inclusion-proof: entry 12: leaf index 12 outside a tree of size 12",
            ],
            id="record_entry_beyond_the_tree",
        ),
    ],
)
def test_cli_refuses_a_changed_record_proof(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    attack: Callable[[RecordProof], RecordProof],
    lines: list[str],
) -> None:
    path = record_file(tmp_path, attack(record_proof(4)))
    status, out, err = run_main([*KEY, str(path)], capsys)
    assert (status, out, err) == (1, lines, [])
    status, out, _ = run_main([*KEY, "--json", str(path)], capsys)
    assert status == 1
    report = json.loads("\n".join(out))
    assert (report["kind"], report["verified"]) == ("central-record-proof", False)
    code, message = lines[1].strip().split(": ", 1)
    assert report["problems"] == [{"code": code, "message": message}]
    assert report["report"]["problem"] == message


def test_cli_refuses_a_record_proof_under_another_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = record_file(tmp_path, record_proof(4))
    status, out, _ = run_main(["--central-key", OTHER_ROOT.verify_key.hex, str(path)], capsys)
    assert status == 1
    assert out == [
        "central record proof: NOT VERIFIED",
        "  bad-signature: checkpoint: 0 of 1 required signatures by trusted keys "
        f"(key {ROOT.key_id} is not trusted)",
    ]


def test_cli_checks_no_time_on_a_record_proof(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # docs/protocol.md §9.3: the checkpoint's time is shown, not judged, so
    # one dated after --at still proves the record.
    entries = central_entries()
    future = make_central_checkpoint(ROOT, state_of(entries), NOW + timedelta(days=30))
    path = record_file(tmp_path, replace(record_proof(4), checkpoint=future))
    status, out, _ = run_main([*KEY, str(path)], capsys)
    assert status == 0
    assert out[1].endswith("the central key signed at 2026-12-25T12:00:00Z")


def test_a_record_proof_is_recognised_by_its_required_members() -> None:
    assert {"entry", "inclusion", "checkpoint"} == RECORD_PROOF_MEMBERS


@pytest.mark.parametrize(
    ("change", "status", "first_line"),
    [
        # Something else, whatever else it holds: never taken for a record proof.
        pytest.param(
            {"format": "msp.central-record-proof.v1"},
            2,
            "is not an audit export, an evidence export, an auditor package, a central log "
            "export, a central record proof or an evidence bundle",
            id="with_a_format",
        ),
        pytest.param(
            {"format": CENTRAL_LOG_EXPORT_FORMAT},
            1,
            "NOT VERIFIED",
            id="a_central_log_export_with_its_members",
        ),
        pytest.param(
            {"payloadType": PayloadType.CHECKPOINT.value},
            2,
            f"is a signed {PayloadType.CHECKPOINT.value} document, not an evidence bundle",
            id="with_a_payload_type",
        ),
        pytest.param(
            {"checkpoint": None},
            2,
            "a central record proof or an evidence bundle",
            id="without_a_checkpoint",
        ),
        # A record proof with one member too many: refused by the strict parser.
        pytest.param({"index": 4}, 1, "NOT VERIFIED", id="with_an_extra_member"),
    ],
)
def test_cli_recognises_record_proofs_only(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, object],
    status: int,
    first_line: str,
) -> None:
    value = json.loads(record_proof(4).build())
    value.update(change)
    value = {name: member for name, member in value.items() if member is not None}
    path = tmp_path / "document.json"
    path.write_bytes(canonicalize(value))
    got, out, err = run_main([*KEY, str(path)], capsys)
    assert got == status
    if status == 2:
        assert out == []
        assert first_line in err[0]
    else:
        assert first_line in out[0]
        assert "malformed-document" in out[1]


def test_cli_refuses_a_certificate_with_a_record_proof(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = record_file(tmp_path, record_proof(4))
    status, out, err = run_main([*KEY, "--certificate", str(path), str(path)], capsys)
    assert (status, out) == (2, [])
    assert err == [
        "msp-verify: --certificate goes with a bare evidence bundle envelope only",
    ]


def test_record_proof_report_travels_with_its_failures() -> None:
    changed = check_central_record_proof(record_tampered_entry(record_proof(4)).build(), CENTRAL)
    assert changed.codes == ("bad-inclusion-proof",)
    report = changed.value
    assert report is not None
    assert (report.verified, report.problem) == (False, NOT_LEADING)
    assert (report.key_id, report.checkpoint_size) == (ROOT.key_id, SIZE)
    assert (report.entry.index, report.entry.data["n"]) == (4, 5)
    forged = check_central_record_proof(
        record_checkpoint_by_other_central_key(record_proof(4)).build(), CENTRAL
    )
    assert forged.value is not None
    assert (forged.value.key_id, forged.value.checkpoint_size) == (None, None)
    assert check_central_record_proof(b"{}", CENTRAL).value is None
    proven = verify_central_record_proof(record_proof(4).build(), CENTRAL)
    assert proven.entry == verify_central_record(record_proof(4).build(), CENTRAL)
