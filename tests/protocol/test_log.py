"""Audit-log entries, replay, checkpoints and receipts."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from msp_protocol import errors
from msp_protocol.canonical import canonicalize
from msp_protocol.delegation import (
    Revocation,
    RevocationList,
    Scope,
    VerifiedDelegation,
    issue_delegation,
    verify_delegation,
)
from msp_protocol.dsse import PayloadType, sign_document
from msp_protocol.encoding import to_hex
from msp_protocol.errors import UsageError
from msp_protocol.keys import SigningKey
from msp_protocol.log import (
    LogEntry,
    LogReplay,
    check_checkpoint,
    check_checkpoint_root,
    check_receipt,
    genesis_entry,
    make_checkpoint,
    make_entry,
    make_receipt,
    parse_entry,
    verify_checkpoint,
)
from msp_protocol.merkle import TreeState, leaf_hash, root_of
from tests.protocol.support import APPLIANCE, NOW, key

SERIAL = "ab" * 16


def build_log(device: SigningKey, count: int) -> list[bytes]:
    raws = [
        genesis_entry(
            appliance_id=APPLIANCE, key_id=device.key_id, certificate_serial=SERIAL, ts=NOW
        ).raw
    ]
    for index in range(1, count):
        record = make_entry(
            index,
            NOW + timedelta(seconds=index),
            "l1.action",
            "runbook:ntp-sync",
            {"action": "restart-timesyncd", "ok": True, "n": index},
        )
        raws.append(record.raw)
    return raws


def test_entry_bytes_are_canonical_and_hash_as_rfc6962_leaves() -> None:
    record = make_entry(3, NOW, "l1.action", "agent", {"b": 1, "a": "\u00e9"})
    assert record.raw == (
        b'{"actor":"agent","data":{"a":"\xc3\xa9","b":1},"index":3,'
        b'"kind":"l1.action","ts":"2026-11-25T12:00:00Z"}'
    )
    assert record.leaf_hash == leaf_hash(record.raw)
    again = parse_entry(record.raw, expected_index=3)
    assert again.entry == record.entry


@pytest.mark.parametrize(
    ("raw", "error", "message"),
    [
        pytest.param(
            b'{"actor":"agent","data":{},"index":1,"kind":"l1.action","ts":"2026-11-25T12:00:00Z"}',
            errors.LogEntryError,
            "entry 2: carries index 1",
            id="wrong_index",
        ),
        pytest.param(
            b'{"index":2,"actor":"agent","data":{},"kind":"l1.action","ts":"2026-11-25T12:00:00Z"}',
            errors.JSONError,
            "entry 2: JSON is not in canonical (RFC 8785) form",
            id="not_canonical",
        ),
        pytest.param(
            b'{"actor":"agent","data":{},"index":2,"kind":"L1","ts":"2026-11-25T12:00:00Z"}',
            errors.ModelError,
            "entry 2: log entry: kind",
            id="bad_kind",
        ),
        pytest.param(
            b'{"actor":"agent","data":{},"index":"2","kind":"l1.action","ts":"2026-11-25T12:00:00Z"}',
            errors.ModelError,
            "index: Input should be a valid integer",
            id="string_index",
        ),
        pytest.param(
            b'{"actor":"agent","data":[],"index":2,"kind":"l1.action","ts":"2026-11-25T12:00:00Z"}',
            errors.ModelError,
            "data: Input should be a valid dictionary",
            id="data_not_object",
        ),
        pytest.param(
            b'{"actor":"agent","actor":"root","data":{},"index":2,"kind":"l1.action","ts":"2026-11-25T12:00:00Z"}',
            errors.JSONError,
            "entry 2: duplicate key in JSON object: 'actor'",
            id="duplicate_key",
        ),
        pytest.param(
            b'{"actor":"agent","data":{},"index":2,"kind":"l1.action","ts":"2026-11-25 12:00:00Z"}',
            errors.ModelError,
            "RFC 3339 UTC with Z",
            id="bad_time",
        ),
    ],
)
def test_bad_entries(raw: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        parse_entry(raw, expected_index=2)


def test_oversize_entry_is_refused_before_parsing() -> None:
    record = make_entry(0, NOW, "l1.action", "agent", {"blob": "x" * 70_000})
    with pytest.raises(errors.MalformedError, match="limit 65536"):
        parse_entry(record.raw)


def test_replay_recomputes_the_root() -> None:
    device = key(2)
    raws = build_log(device, 37)
    replay = LogReplay(appliance_id=APPLIANCE)
    replay.extend(raws)
    assert replay.size == 37
    assert replay.root() == root_of([leaf_hash(raw) for raw in raws])
    assert replay.genesis is not None
    assert replay.genesis.key_id == device.key_id


def test_replay_names_the_first_bad_index() -> None:
    raws = build_log(key(2), 10)
    gap = raws[:5] + raws[6:]
    replay = LogReplay()
    with pytest.raises(errors.LogEntryError, match="entry 5: carries index 6"):
        replay.extend(gap)
    assert replay.size == 5


def test_replay_requires_genesis_first_and_only_once() -> None:
    raws = build_log(key(2), 3)
    with pytest.raises(errors.LogEntryError, match=r"entry 0: kind is l1\.action"):
        LogReplay().add(make_entry(0, NOW, "l1.action", "agent", {}).raw)
    second_genesis = canonicalize({**_entry_dict(raws[0]), "index": 3})
    replay = LogReplay()
    replay.extend(raws)
    with pytest.raises(errors.LogEntryError, match=r"entry 3: a second chain\.genesis"):
        replay.add(second_genesis)
    with pytest.raises(errors.LogEntryError, match="genesis of appliance appliance-1, expected x"):
        LogReplay(appliance_id="x").add(raws[0])


def _entry_dict(raw: bytes) -> dict[str, object]:
    return parse_entry(raw).entry.to_wire()


def test_replay_resumes_from_a_tree_state() -> None:
    raws = build_log(key(2), 20)
    first = LogReplay()
    first.extend(raws[:12])
    resumed = LogReplay(state=first.state)
    resumed.extend(raws[12:])
    assert resumed.root() == root_of([leaf_hash(raw) for raw in raws])
    assert first.size == 12, "resuming must not mutate the state it started from"


# --- checkpoints ------------------------------------------------------------------


def delegation_for(device: SigningKey, scopes: tuple[Scope, ...]) -> VerifiedDelegation:
    root = key(1)
    envelope = issue_delegation(
        root,
        subject=device.verify_key,
        appliance_id=APPLIANCE,
        site_id="site-1",
        scopes=scopes,
        not_before=NOW,
        serial=SERIAL,
    )
    return verify_delegation(envelope, roots=[root.verify_key], at=NOW)


def test_checkpoint_signed_and_matched_against_the_entries() -> None:
    device = key(2)
    delegation = delegation_for(device, (Scope.AUDIT,))
    replay = LogReplay()
    replay.extend(build_log(device, 9))
    envelope = make_checkpoint(device, appliance_id=APPLIANCE, state=replay.state, ts=NOW)
    verified = verify_checkpoint(envelope, delegation=delegation)
    assert verified.checkpoint.size == 9
    assert verified.checkpoint.origin == "msp/appliance-1"
    assert check_checkpoint_root(verified.checkpoint, replay).ok
    replay.add(make_entry(9, NOW, "l1.action", "agent", {}).raw)
    assert check_checkpoint_root(verified.checkpoint, replay).codes == ("bad-checkpoint",)


def test_checkpoint_root_mismatch_is_named() -> None:
    device = key(2)
    delegation = delegation_for(device, (Scope.AUDIT,))
    replay = LogReplay()
    replay.extend(build_log(device, 4))
    forged_state = TreeState()
    forged_state.extend([leaf_hash(b"x")] * 4)
    envelope = make_checkpoint(device, appliance_id=APPLIANCE, state=forged_state, ts=NOW)
    checkpoint = verify_checkpoint(envelope, delegation=delegation).checkpoint
    result = check_checkpoint_root(checkpoint, replay)
    assert "checkpoint root at size 4 does not match the entries" in result.describe()


def test_checkpoint_refusals() -> None:
    device = key(2)
    state = TreeState()
    state.extend([leaf_hash(b"a"), leaf_hash(b"b")])
    envelope = make_checkpoint(device, appliance_id=APPLIANCE, state=state, ts=NOW)

    evidence_only = delegation_for(device, (Scope.EVIDENCE,))
    assert check_checkpoint(envelope, delegation=evidence_only).codes == ("scope-not-granted",)

    other_device = delegation_for(key(3), (Scope.AUDIT,))
    assert check_checkpoint(envelope, delegation=other_device).codes == ("bad-signature",)

    foreign = make_checkpoint(device, appliance_id="appliance-2", state=state, ts=NOW)
    audit = delegation_for(device, (Scope.AUDIT,))
    assert check_checkpoint(foreign, delegation=audit).codes == ("wrong-subject",)

    as_evidence = sign_document(
        PayloadType.EVIDENCE,
        {
            "origin": "msp/appliance-1",
            "size": 2,
            "root": to_hex(state.root()),
            "ts": "2026-11-25T12:00:00Z",
        },
        [device],
    )
    assert check_checkpoint(as_evidence, delegation=audit).codes == ("wrong-payload-type",)


def test_checkpoint_after_revocation_cutoff_is_refused() -> None:
    device = key(2)
    audit = delegation_for(device, (Scope.AUDIT,))
    revoked = RevocationList(
        version=1,
        issuer=key(1).key_id,
        issued_at=NOW,
        revoked=(Revocation(serial=SERIAL, appliance_id=APPLIANCE, cutoff_size=2, revoked_at=NOW),),
    )
    state = TreeState()
    state.extend([leaf_hash(b"a"), leaf_hash(b"b")])
    at_cutoff = make_checkpoint(device, appliance_id=APPLIANCE, state=state, ts=NOW)
    assert check_checkpoint(at_cutoff, delegation=audit, revocations=revoked).ok
    state.append(leaf_hash(b"c"))
    beyond = make_checkpoint(device, appliance_id=APPLIANCE, state=state, ts=NOW)
    result = check_checkpoint(beyond, delegation=audit, revocations=revoked)
    assert result.codes == ("certificate-revoked",)
    assert "size 3" in result.describe()


# --- receipts ---------------------------------------------------------------------


def test_receipt_binds_the_exact_checkpoint() -> None:
    root, device = key(1), key(2)
    audit = delegation_for(device, (Scope.AUDIT,))
    state = TreeState()
    state.extend([leaf_hash(b"a")])
    checkpoint = verify_checkpoint(
        make_checkpoint(device, appliance_id=APPLIANCE, state=state, ts=NOW), delegation=audit
    )
    receipt = make_receipt(root, checkpoint, NOW + timedelta(seconds=1))
    verified = check_receipt(receipt, roots=[root.verify_key], checkpoint=checkpoint)
    assert verified.ok
    assert verified.unwrap().receipt.checkpoint_sha256 == checkpoint.digest

    # Same tree state, signed again at another time: a different checkpoint.
    resigned = verify_checkpoint(
        make_checkpoint(device, appliance_id=APPLIANCE, state=state, ts=NOW + timedelta(hours=1)),
        delegation=audit,
    )
    other = check_receipt(receipt, roots=[root.verify_key], checkpoint=resigned)
    assert "another signing of this checkpoint" in other.describe()

    state.append(leaf_hash(b"b"))
    grown = verify_checkpoint(
        make_checkpoint(device, appliance_id=APPLIANCE, state=state, ts=NOW), delegation=audit
    )
    assert (
        "size 1, checkpoint is msp/appliance-1 size 2"
        in check_receipt(receipt, roots=[root.verify_key], checkpoint=grown).describe()
    )

    assert check_receipt(receipt, roots=[device.verify_key]).codes == ("bad-signature",)


# --- make_entry: the fast builder agrees with the model ------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
KINDS = st.from_regex(r"\A[a-z][a-z0-9_]{0,5}(\.[a-z][a-z0-9_]{0,5}){1,4}\Z") | st.text(max_size=10)
ACTORS = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,130}\Z") | st.text(max_size=10)
INDICES = st.integers(-3, 2**53 + 3) | st.sampled_from([True, 1.0, "1"])
TIMES = st.datetimes(timezones=st.just(UTC)) | st.datetimes()


def reference_entry(
    index: object, ts: datetime, kind: object, actor: object, data: object
) -> bytes | None:
    """The slow path: validate through the pydantic model, encode the whole
    entry (canonicalize is held to rfc8785 in test_canonical)."""
    try:
        entry = LogEntry(index=index, ts=ts, kind=kind, actor=actor, data=data)  # type: ignore[arg-type]
        return canonicalize(entry.to_wire())
    except (ValidationError, PydanticSerializationError, UsageError):
        return None


@given(
    index=INDICES,
    ts=TIMES,
    kind=KINDS,
    actor=ACTORS,
    data=st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4) | JSON_VALUES,
)
@settings(max_examples=400)
def test_make_entry_agrees_with_the_model(
    index: object, ts: datetime, kind: object, actor: object, data: object
) -> None:
    expected = reference_entry(index, ts, kind, actor, data)
    try:
        record = make_entry(index, ts, kind, actor, data)  # type: ignore[arg-type]
    except UsageError:
        assert expected is None
        return
    assert record.raw == expected
    assert parse_entry(record.raw).entry == record.entry


# --- property: the parser's direct entry check agrees with the model ---------------

_TIMES = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")),
    st.sampled_from(
        [
            "2026-11-25T12:00:00Z",
            "2026-11-25T12:00:00.5Z",
            "2026-11-25T12:00:00.50Z",
            "2026-11-25 12:00:00Z",
            "2026-13-25T12:00:00Z",
            "2026-11-25T12:00:00+00:00",
            "",
        ]
    ),
)
_FIELD_VALUES = {
    "index": st.one_of(st.integers(min_value=-2, max_value=2**53 + 1), st.booleans(), st.just("1"), st.floats()),
    "ts": st.one_of(_TIMES, st.integers()),
    "kind": st.one_of(st.sampled_from(["check.run", "a.b.c.d", "a.b.c.d.e", "Check.run", "check", "x" * 70 + ".y"]), st.text(max_size=8)),
    "actor": st.one_of(st.sampled_from(["agent", "a" * 128, "a" * 129, "-x", "user@site/1"]), st.text(max_size=8)),
    "data": st.one_of(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.lists(st.integers(), max_size=2), st.none()),
}  # fmt: skip


@settings(max_examples=600)
@given(
    st.fixed_dictionaries(
        _FIELD_VALUES,
        optional={"extra": st.integers()},
    ).flatmap(
        lambda d: st.sets(st.sampled_from(sorted(d)), max_size=1).map(
            lambda drop: {k: v for k, v in d.items() if k not in drop}
        )
    )
)
def test_direct_entry_check_agrees_with_the_model(value: dict[str, object]) -> None:
    from msp_protocol.log import LogEntry, _entry_fields

    fields = _entry_fields(value)
    fast = (
        None
        if fields is None
        else dict(zip(("index", "ts", "kind", "actor", "data"), fields, strict=True))
    )
    try:
        model: LogEntry | None = LogEntry.from_wire(value)
    except errors.MalformedError:
        model = None
    if fast is None:
        assert model is None, value
    else:
        assert model is not None, value
        assert fast == dict(model)
