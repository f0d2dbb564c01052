"""docs/protocol.md's examples are generated here, and checked here.

Every fenced block in docs/protocol.md that follows an
``<!-- example: NAME -->`` comment is produced by :func:`examples` from
fixed inputs (the example keys' seeds, fixed times, serials and nonces)
with the package's real functions. :func:`test_document_examples_are_current`
fails when a block differs by one byte from what the code produces today;
``MSP_UPDATE_PROTOCOL_DOC=1`` rewrites the blocks instead. The other tests
show each example is right, not merely stable: signatures verify under the
example public keys, hashes are recomputed with hashlib, canonical bytes
with the ``rfc8785`` package, and each export passes its checker and
``msp-verify``.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import rfc8785

from msp_protocol.bundle import BundleKind, ConfigBundle, Escalation, check_bundle, sign_bundle
from msp_protocol.canonical import canonicalize
from msp_protocol.central_log import (
    build_central_log_export,
    build_central_record_proof,
    central_genesis_entry,
    check_central_log_export,
    check_central_record,
    make_central_checkpoint,
)
from msp_protocol.delegation import (
    DelegationRequest,
    Revocation,
    RevocationList,
    Scope,
    check_delegation,
    check_delegation_request,
    check_revocations,
    issue_delegation,
    sign_revocations,
    token_digest,
)
from msp_protocol.dsse import Envelope, PayloadType, pae, sign_document
from msp_protocol.encoding import format_time
from msp_protocol.evidence import EvidenceBundle, check_evidence, evidence_entry_data, sign_evidence
from msp_protocol.export import (
    build_audit_export,
    build_evidence_export,
    check_audit_export,
    check_evidence_export,
)
from msp_protocol.httpsig import (
    HttpRequest,
    parse_signature,
    sign_request,
    signature_base,
    verify_request,
)
from msp_protocol.keys import SigningKey
from msp_protocol.log import (
    EntryRecord,
    VerifiedCheckpoint,
    check_checkpoint,
    check_receipt,
    genesis_entry,
    make_checkpoint,
    make_entry,
    make_receipt,
)
from msp_protocol.merkle import (
    LeafHashTree,
    TreeState,
    check_consistency,
    check_inclusion,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
)
from msp_protocol.package import LogSegmentParts, build_auditor_package, check_auditor_package
from msp_protocol.summary import summarise_evidence
from msp_protocol.sync import SyncRequest
from msp_protocol.urls import normalize_central_url
from msp_protocol.verify_cli import main as msp_verify

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
UPDATE = os.environ.get("MSP_UPDATE_PROTOCOL_DOC") == "1"
# A marker, then a fenced block whose body holds no fence of its own (an
# empty block is a fence and its closing fence).
BLOCK = re.compile(
    r"<!-- example: (?P<name>[a-z0-9-]+) -->\n```(?P<lang>[a-z]*)\n"
    r"(?P<body>(?:(?!```).)*?)\n?```\n",
    re.DOTALL,
)

# Example keys: their seeds are printed in the document. Never use them.
ROOT_SEED = bytes.fromhex("01" * 32)
DEVICE_SEED = bytes.fromhex("02" * 32)

APPLIANCE = "appliance-0001"
SITE = "site-0001"
SERIAL = "00112233445566778899aabbccddeeff"
REVOKED_SERIAL = "ffeeddccbbaa99887766554433221100"
TOKEN = "example-enrollment-token"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
CENTRAL_URL = "https://central.example.com"
NONCE = "6e6f6e63652d6e6f6e63652d6e6f6e63"
CONTROL = ("hipaa", "164.312(a)(2)(iv)", "Encryption and decryption")


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@dataclass(frozen=True)
class World:
    """Every artifact the examples show, built once from the fixed inputs."""

    root: SigningKey
    device: SigningKey
    certificate: Envelope
    request: Envelope
    revocations: Envelope
    config_bundle: Envelope
    escalation: bytes  # the JCS body of POST .../escalations
    evidence: Envelope
    bundle: EvidenceBundle
    records: tuple[EntryRecord, ...]
    checkpoint2: Envelope
    checkpoint4: Envelope
    verified4: VerifiedCheckpoint
    receipt4: Envelope
    inclusion: tuple[bytes, ...]  # entry 2 in the tree of size 4
    consistency: tuple[bytes, ...]  # from size 3 to size 4
    http_url: str
    http_body: bytes
    http_headers: dict[str, str]
    audit_export: bytes
    evidence_export: bytes
    central_records: tuple[EntryRecord, ...]
    central_checkpoint: Envelope
    central_export: bytes
    central_proof: bytes
    package: bytes


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def pretty_jcs(value: Any) -> str:
    """``value`` indented, its members in JCS order: the order producers
    write (the document shows every JSON example so)."""
    return pretty(json.loads(canonicalize(value)))


def signed_payload(envelope: Envelope) -> bytes:
    return envelope.payload_bytes()


@functools.cache
def world() -> World:
    root = SigningKey(ROOT_SEED)
    device = SigningKey(DEVICE_SEED)
    certificate = issue_delegation(
        root,
        subject=device.verify_key,
        appliance_id=APPLIANCE,
        site_id=SITE,
        scopes=[Scope.AUDIT, Scope.EVIDENCE],
        not_before=T0,
        lifetime=timedelta(days=30),
        serial=SERIAL,
    )
    request = sign_document(
        PayloadType.DELEGATION_REQUEST,
        DelegationRequest(
            purpose="enroll",
            audience=root.key_id,
            subject_key=device.verify_key.hex,
            scopes=(Scope.AUDIT, Scope.EVIDENCE),
            token_sha256=token_digest(TOKEN),
            created=at(-1),
            nonce="0f1e2d3c4b5a69788796a5b4c3d2e1f0",
        ),
        [device],
    )
    revocations = sign_revocations(
        root,
        RevocationList(
            version=1,
            issuer=root.key_id,
            issued_at=at(60),
            revoked=(
                Revocation(
                    serial=REVOKED_SERIAL,
                    appliance_id="appliance-0002",
                    cutoff_size=41,
                    revoked_at=at(59),
                    reason="appliance stolen",
                ),
            ),
        ),
    )
    config_bundle = sign_bundle(
        root,
        ConfigBundle(
            kind=BundleKind.FRAMEWORKS,
            site_id=SITE,
            version=3,
            issued_at=at(-120),
            expires_at=at(-120) + timedelta(days=7),
            content={
                "frameworks": [
                    {
                        "id": CONTROL[0],
                        "name": "HIPAA Security Rule",
                        "edition": "2013",
                        "controls": [
                            {"id": CONTROL[1], "title": CONTROL[2], "runbooks": ["disk-encryption"]}
                        ],
                    }
                ]
            },
        ),
    )
    escalation = Escalation(
        escalation_id="escalation-0001",
        appliance_id=APPLIANCE,
        site_id=SITE,
        severity="high",
        title="Disk encryption is off and could not be turned back on",
        detail={"check_id": "disk-encryption", "result": "fail", "unencrypted_volumes": 1},
        created_at=at(11),
    ).canonical_bytes()
    bundle = EvidenceBundle(
        bundle_id="bundle-0001",
        site_id=SITE,
        appliance_id=APPLIANCE,
        check_id="disk-encryption",
        controls={CONTROL[0]: (CONTROL[1],)},
        result="pass",
        observed={"encrypted_volumes": 1, "unencrypted_volumes": 0},
        collected_at=at(3),
        log_index=2,
    )
    evidence = sign_evidence(device, bundle)
    records = (
        genesis_entry(
            appliance_id=APPLIANCE, key_id=device.key_id, certificate_serial=SERIAL, ts=at(1)
        ),
        make_entry(1, at(2), "agent.started", "agent", {"pid": 812, "version": "0.1.0"}),
        make_entry(2, at(3), "evidence.signed", "agent", evidence_entry_data(evidence)),
        make_entry(
            3,
            at(4),
            "check.run",
            "agent",
            {"check_id": "ntp-sync", "observed": {"offset_ms": 3}, "result": "pass"},
        ),
    )
    leaves = [record.leaf_hash for record in records]
    tree = LeafHashTree(leaves)
    state2, state4 = TreeState(), TreeState()
    state2.extend(leaves[:2])
    state4.extend(leaves)
    checkpoint2 = make_checkpoint(device, appliance_id=APPLIANCE, state=state2, ts=at(2.5))
    checkpoint4 = make_checkpoint(device, appliance_id=APPLIANCE, state=state4, ts=at(5))
    delegation = check_delegation(certificate, roots=[root.verify_key], at=at(5)).unwrap()
    verified4 = check_checkpoint(checkpoint4, delegation=delegation).unwrap()
    receipt4 = make_receipt(root, verified4, witnessed_at=at(6))

    http_url = f"{CENTRAL_URL}/api/v1/appliances/{APPLIANCE}/heartbeat"
    http_body = canonicalize(
        {"clock": format_time(at(7)), "log_size": 4, "queues": {"urgent": 0}, "version": "0.1.0"}
    )
    http_headers = {"Content-Type": "application/json"}
    http_headers.update(
        sign_request(
            device,
            "POST",
            http_url,
            body=http_body,
            created=int(at(7).timestamp()),
            nonce=NONCE,
        )
    )

    audit_export = build_audit_export(
        appliance_id=APPLIANCE,
        exported_at=at(8),
        entries=[record.raw for record in records],
        checkpoints=[checkpoint2, checkpoint4],
        certificates=[certificate],
        receipts=[receipt4],
        revocations=revocations,
        evidence=[evidence],
    )
    evidence_export = build_evidence_export(
        evidence=evidence,
        certificate=certificate,
        entry=records[2].raw,
        inclusion=inclusion_proof(2, 4, tree),
        checkpoint=checkpoint4,
        receipt=receipt4,
    )

    central_records = (
        central_genesis_entry(root.verify_key, at(-60)),
        make_entry(
            1,
            at(-30),
            "site.created",
            "partner:partner-0001",
            {"name": "Clinic", "site_id": SITE},
        ),
    )
    central_state = TreeState()
    central_state.extend([record.leaf_hash for record in central_records])
    central_checkpoint = make_central_checkpoint(root, central_state, at(-29))
    central_export = build_central_log_export(
        exported_at=at(9),
        entries=[record.raw for record in central_records],
        checkpoint=central_checkpoint,
    )
    central_tree = LeafHashTree([record.leaf_hash for record in central_records])
    central_proof = build_central_record_proof(
        entry=central_records[1].raw,
        inclusion=inclusion_proof(1, 2, central_tree),
        checkpoint=central_checkpoint,
    )

    prefix = TreeState()
    prefix.extend(leaves[:2])
    period_end = T0 + timedelta(days=1)
    package = build_auditor_package(
        site_id=SITE,
        frameworks=[CONTROL[0]],
        period_start=T0,
        period_end=period_end,
        generated_at=at(10),
        logs=[
            LogSegmentParts(
                appliance_id=APPLIANCE,
                start=2,
                prefix=list(prefix.nodes),
                entries=[record.raw for record in records[2:]],
                checkpoint=checkpoint4,
                receipt=receipt4,
                certificates=[certificate],
            )
        ],
        evidence=[evidence],
        revocations=revocations,
        summary=summarise_evidence(
            [bundle], [CONTROL], period_end=period_end, freshness_seconds=2 * 86400
        ),
    )
    return World(
        root=root,
        device=device,
        certificate=certificate,
        request=request,
        revocations=revocations,
        config_bundle=config_bundle,
        escalation=escalation,
        evidence=evidence,
        bundle=bundle,
        records=records,
        checkpoint2=checkpoint2,
        checkpoint4=checkpoint4,
        verified4=verified4,
        receipt4=receipt4,
        inclusion=tuple(inclusion_proof(2, 4, tree)),
        consistency=tuple(consistency_proof(3, 4, tree)),
        http_url=http_url,
        http_body=http_body,
        http_headers=http_headers,
        audit_export=audit_export,
        evidence_export=evidence_export,
        central_records=central_records,
        central_checkpoint=central_checkpoint,
        central_export=central_export,
        central_proof=central_proof,
        package=package,
    )


def run_msp_verify(name: str, data: bytes) -> str:
    """msp-verify's human report of ``data`` (the file is named ``name``)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / name
        path.write_bytes(data)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = msp_verify(
                [
                    "--central-key",
                    world().root.verify_key.hex,
                    "--at",
                    format_time(at(60)),
                    str(path),
                ]
            )
    return (
        f"$ msp-verify --central-key <central key> {name}\n{out.getvalue()}(exit status {status})"
    )


def examples() -> dict[str, str]:
    """Each example block's text, by name."""
    w = world()
    records = w.records
    leaves = [record.leaf_hash for record in records]
    h01, h23 = node_hash(leaves[0], leaves[1]), node_hash(leaves[2], leaves[3])
    checkpoint_payload = signed_payload(w.checkpoint4)
    jcs_input = {"z": 1, "a": {"é": "caf\u00e9", "b": [3, 1.0, 2.5e-7]}, "n": None, "10": True}
    request = HttpRequest.build("POST", w.http_url, w.http_headers.items())
    parsed = parse_signature(request, label="msp")
    return {
        "keys": "\n".join(
            [
                f"central root seed (example only): {ROOT_SEED.hex()}",
                f"central root public key:          {w.root.verify_key.hex}",
                f"central root key id:              {w.root.key_id}",
                f"device seed (example only):       {DEVICE_SEED.hex()}",
                f"device public key:                {w.device.verify_key.hex}",
                f"device key id:                    {w.device.key_id}",
            ]
        ),
        "jcs-input": pretty(jcs_input),
        "jcs-output": canonicalize(jcs_input).decode(),
        "enrollment-request-payload": pretty(json.loads(signed_payload(w.request))),
        "enrollment-token-digest": (
            f"token (example only):  {TOKEN}\nSHA-256(UTF-8 token) = {token_digest(TOKEN)}"
        ),
        "enrollment-body": pretty_jcs({"request": w.request.to_wire(), "token": TOKEN}),
        "certificate-payload": signed_payload(w.certificate).decode(),
        "certificate-envelope": pretty_jcs(w.certificate.to_wire()),
        "revocations-payload": pretty(json.loads(signed_payload(w.revocations))),
        "config-bundle-payload": pretty(json.loads(signed_payload(w.config_bundle))),
        "config-bundle-envelope": pretty_jcs(w.config_bundle.to_wire()),
        "escalation": w.escalation.decode(),
        "entries": "\n".join(record.raw.decode() for record in records),
        "merkle": "\n".join(
            [
                *(
                    f"leaf {i} = SHA-256(00 || entry {i}) = {leaf.hex()}"
                    for i, leaf in enumerate(leaves)
                ),
                f"node 0..1 = SHA-256(01 || leaf 0 || leaf 1) = {h01.hex()}",
                f"node 2..3 = SHA-256(01 || leaf 2 || leaf 3) = {h23.hex()}",
                f"root of size 2 = node 0..1 = {h01.hex()}",
                f"root of size 3 = SHA-256(01 || node 0..1 || leaf 2) = "
                f"{node_hash(h01, leaves[2]).hex()}",
                f"root of size 4 = SHA-256(01 || node 0..1 || node 2..3) = "
                f"{node_hash(h01, h23).hex()}",
                "inclusion proof of entry 2 in size 4 (leaf side first): "
                + ", ".join(node.hex() for node in w.inclusion),
                "consistency proof from size 3 to size 4: "
                + ", ".join(node.hex() for node in w.consistency),
            ]
        ),
        "checkpoint-payload": checkpoint_payload.decode(),
        "checkpoint-pae": pae(w.checkpoint4.payloadType, checkpoint_payload).decode(),
        "checkpoint-envelope": pretty_jcs(w.checkpoint4.to_wire()),
        "receipt-payload": signed_payload(w.receipt4).decode(),
        "receipt-digest": (
            f"SHA-256(checkpoint payload) = {hashlib.sha256(checkpoint_payload).hexdigest()}"
        ),
        "evidence-payload": pretty(json.loads(signed_payload(w.evidence))),
        "http-request": "\n".join(
            [f"POST /api/v1/appliances/{APPLIANCE}/heartbeat HTTP/1.1", "Host: central.example.com"]
            + [f"{name}: {value}" for name, value in w.http_headers.items()]
            + ["", w.http_body.decode()]
        ),
        "signature-base": signature_base(parsed.components, parsed.params, request).decode(),
        "public-url": "\n".join(
            f"{spelt!r:44} -> {normalize_central_url(spelt)}"
            for spelt in (
                "https://Central.Example.com:443/",
                "HTTPS://central.example.com/msp/./api/..",
                "https://central.example.com/%7emsp/a%2fb",
                "http://[0:0:0::1]:8080/",
                "https://Bücher.Example",
            )
        ),
        "sync-request": pretty_jcs(
            SyncRequest.build(
                old_size=0,
                entries=[record.raw for record in records],
                consistency=[],
                checkpoint=w.checkpoint4,
            ).to_wire()
        ),
        "audit-export": pretty(json.loads(w.audit_export)),
        "audit-export-verify": run_msp_verify("audit-export.json", w.audit_export),
        "evidence-export": pretty(json.loads(w.evidence_export)),
        "evidence-export-verify": run_msp_verify("evidence-export.json", w.evidence_export),
        "central-entries": "\n".join(record.raw.decode() for record in w.central_records),
        "central-checkpoint-payload": signed_payload(w.central_checkpoint).decode(),
        "central-log-export": pretty(json.loads(w.central_export)),
        "central-record-proof": pretty(json.loads(w.central_proof)),
        "central-record-proof-verify": run_msp_verify("central-record-proof.json", w.central_proof),
        "auditor-package": pretty(json.loads(w.package)),
        "auditor-package-verify": run_msp_verify("auditor-package.json", w.package),
    }


# --- the document ------------------------------------------------------------------


def document_blocks(text: str) -> dict[str, str]:
    blocks: dict[str, str] = {}
    for match in BLOCK.finditer(text):
        name = match["name"]
        assert name not in blocks, f"example {name} appears twice in {DOC.name}"
        blocks[name] = match["body"]
    return blocks


def rewrite(text: str, generated: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        body = generated.get(match["name"], match["body"])
        return f"<!-- example: {match['name']} -->\n```{match['lang']}\n{body}\n```\n"

    return BLOCK.sub(replace, text)


def skeleton(text: str) -> str:
    """The document without the bodies of its example blocks."""
    return BLOCK.sub(lambda match: f"<!-- example: {match['name']} -->\n", text)


def test_document_examples_are_current() -> None:
    text = DOC.read_text(encoding="utf-8")
    generated = examples()
    if UPDATE:
        updated = rewrite(text, generated)
        # Only example bodies may change: prose is never rewritten.
        assert skeleton(updated) == skeleton(text)
        if updated != text:
            DOC.write_text(updated, encoding="utf-8")
        text = updated
    blocks = document_blocks(text)
    assert sorted(blocks) == sorted(generated), (
        "examples in the document and in the generator differ: "
        f"only in the document {sorted(set(blocks) - set(generated))}, "
        f"only generated {sorted(set(generated) - set(blocks))}"
    )
    stale = [name for name in generated if blocks[name] != generated[name]]
    assert not stale, (
        f"examples {stale} in {DOC.name} differ from what the code produces; "
        "rerun with MSP_UPDATE_PROTOCOL_DOC=1 and review the diff"
    )


def test_every_example_marker_has_its_block() -> None:
    text = DOC.read_text(encoding="utf-8")
    markers = re.findall(r"<!-- example: ([a-z0-9-]+) -->", text)
    assert sorted(markers) == sorted(document_blocks(text))


# --- the examples are right ----------------------------------------------------------


def test_key_ids_are_the_first_16_hex_of_sha256_of_the_public_key() -> None:
    w = world()
    for key, seed in ((w.root, ROOT_SEED), (w.device, DEVICE_SEED)):
        public = bytes(nacl.signing.SigningKey(seed).verify_key)
        assert key.verify_key.raw == public
        assert key.key_id == hashlib.sha256(public).hexdigest()[:16]


def test_the_jcs_example_is_rfc8785() -> None:
    value = json.loads(examples()["jcs-input"])
    assert examples()["jcs-output"].encode() == rfc8785.dumps(value)


def independent_pae(payload_type: str, payload: bytes) -> bytes:
    kind = payload_type.encode()
    return (
        b"DSSEv1 "
        + str(len(kind)).encode()
        + b" "
        + kind
        + b" "
        + str(len(payload)).encode()
        + b" "
        + payload
    )


def verify_dsse(envelope: Envelope, public: bytes, payload_type: PayloadType) -> bytes:
    """Verify a DSSE signature with nothing but the spec and PyNaCl."""
    assert envelope.payloadType == payload_type.value
    payload = base64.b64decode(envelope.payload, validate=True)
    assert payload == rfc8785.dumps(json.loads(payload)), "a signed payload is not JCS"
    for signature in envelope.signatures:
        if signature.keyid == hashlib.sha256(public).hexdigest()[:16]:
            nacl.signing.VerifyKey(public).verify(
                independent_pae(envelope.payloadType, payload), base64.b64decode(signature.sig)
            )
            return payload
    raise AssertionError("no signature by the expected key")


def test_signed_documents_verify_under_the_example_keys() -> None:
    w = world()
    root, device = w.root.verify_key.raw, w.device.verify_key.raw
    verify_dsse(w.certificate, root, PayloadType.DELEGATION)
    verify_dsse(w.request, device, PayloadType.DELEGATION_REQUEST)
    verify_dsse(w.revocations, root, PayloadType.REVOCATIONS)
    verify_dsse(w.config_bundle, root, PayloadType.BUNDLE)
    verify_dsse(w.evidence, device, PayloadType.EVIDENCE)
    verify_dsse(w.checkpoint4, device, PayloadType.CHECKPOINT)
    verify_dsse(w.receipt4, root, PayloadType.RECEIPT)
    verify_dsse(w.central_checkpoint, root, PayloadType.CHECKPOINT)
    assert examples()["checkpoint-pae"].encode() == independent_pae(
        w.checkpoint4.payloadType, w.checkpoint4.payload_bytes()
    )


def test_signed_documents_pass_their_checks() -> None:
    w = world()
    roots = [w.root.verify_key]
    delegation = check_delegation(
        w.certificate, roots=roots, at=at(60), scope=Scope.AUDIT, appliance_id=APPLIANCE
    ).unwrap()
    assert delegation.certificate.issuer == w.root.key_id
    check_delegation_request(
        w.request, purpose="enroll", audience=w.root.key_id, now=T0, enrollment_token=TOKEN
    ).unwrap()
    check_revocations(w.revocations, roots=roots).unwrap()
    configuration = check_bundle(
        w.config_bundle, roots=roots, kind=BundleKind.FRAMEWORKS, site_id=SITE, at=at(60)
    ).unwrap()
    assert (configuration.bundle.version, configuration.stale) == (3, False)
    check_evidence(w.evidence, delegation=delegation).unwrap()
    checkpoint = check_checkpoint(w.checkpoint4, delegation=delegation).unwrap()
    check_receipt(w.receipt4, roots=roots, checkpoint=checkpoint).unwrap()


def test_the_receipt_binds_the_sha256_of_the_checkpoint_payload() -> None:
    w = world()
    receipt = json.loads(w.receipt4.payload_bytes())
    checkpoint = json.loads(w.checkpoint4.payload_bytes())
    assert receipt["checkpoint_sha256"] == hashlib.sha256(w.checkpoint4.payload_bytes()).hexdigest()
    assert (receipt["origin"], receipt["size"], receipt["root"]) == (
        checkpoint["origin"],
        checkpoint["size"],
        checkpoint["root"],
    )


def independent_root(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 MTH, recursively, with hashlib."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(
        b"\x01" + independent_root(leaves[:k]) + independent_root(leaves[k:])
    ).digest()


def test_the_merkle_example_is_rfc9162() -> None:
    w = world()
    leaves = [hashlib.sha256(b"\x00" + record.raw).digest() for record in w.records]
    assert leaves == [leaf_hash(record.raw) for record in w.records]
    for record in w.records:
        assert record.raw == rfc8785.dumps(json.loads(record.raw))
    root4, root3 = independent_root(leaves), independent_root(leaves[:3])
    assert json.loads(w.checkpoint4.payload_bytes())["root"] == root4.hex()
    assert json.loads(w.checkpoint2.payload_bytes())["root"] == independent_root(leaves[:2]).hex()
    check_inclusion(leaves[2], 2, 4, w.inclusion, root4).unwrap()
    check_consistency(3, 4, root3, root4, w.consistency).unwrap()
    text = examples()["merkle"]
    assert root4.hex() in text
    assert root3.hex() in text


def test_the_request_signature_verifies() -> None:
    w = world()
    headers = w.http_headers
    assert headers["Content-Digest"] == (
        "sha-256=:" + base64.b64encode(hashlib.sha256(w.http_body).digest()).decode() + ":"
    )
    base = examples()["signature-base"].encode()
    signature = re.fullmatch(r"msp=:([A-Za-z0-9+/=]+):", headers["Signature"])
    assert signature is not None
    nacl.signing.VerifyKey(w.device.verify_key.raw).verify(base, base64.b64decode(signature[1]))
    verify_request(
        HttpRequest.build("POST", w.http_url, headers.items()),
        w.http_body,
        resolve_key=lambda key_id: w.device.verify_key if key_id == w.device.key_id else None,
        nonce_seen=lambda key_id, nonce, created: False,
        now=at(7),
    )


def test_the_exports_verify() -> None:
    w = world()
    roots = [w.root.verify_key]
    audit = check_audit_export(w.audit_export, roots, at=at(60)).unwrap()
    assert (audit.size, audit.witnessed_size, audit.evidence) == (4, 4, 1)
    evidence = check_evidence_export(w.evidence_export, roots, at=at(60)).unwrap()
    assert evidence.proven_in_log
    central = check_central_log_export(w.central_export, roots, at=at(60)).unwrap()
    assert central.size == 2
    assert check_central_record(w.central_proof, roots).unwrap().kind == "site.created"
    package = check_auditor_package(w.package, roots, at=at(60)).unwrap()
    assert (package.bundles, package.summary_verified) == (1, True)
    for name in (
        "audit-export-verify",
        "evidence-export-verify",
        "central-record-proof-verify",
        "auditor-package-verify",
    ):
        assert examples()[name].endswith("(exit status 0)"), name


@pytest.mark.parametrize(
    "name",
    ["certificate-payload", "checkpoint-payload", "receipt-payload", "entries", "escalation"],
)
def test_one_line_examples_are_canonical(name: str) -> None:
    for line in examples()[name].splitlines():
        assert line.encode() == rfc8785.dumps(json.loads(line))


def test_the_enrollment_example_binds_its_token_and_key() -> None:
    w = world()
    body = json.loads(examples()["enrollment-body"])
    assert body["token"] == TOKEN
    assert Envelope.from_wire(body["request"]) == w.request
    payload = json.loads(
        verify_dsse(w.request, w.device.verify_key.raw, PayloadType.DELEGATION_REQUEST)
    )
    assert payload["token_sha256"] == hashlib.sha256(TOKEN.encode("utf-8")).hexdigest()
    assert payload["token_sha256"] in examples()["enrollment-token-digest"]
    # Proof of possession: the request is signed by the key it asks to certify.
    assert (
        w.request.signatures[0].keyid
        == hashlib.sha256(bytes.fromhex(payload["subject_key"])).hexdigest()[:16]
    )


def test_the_escalation_example_is_a_strict_canonical_escalation() -> None:
    body = examples()["escalation"].encode()
    assert body == rfc8785.dumps(json.loads(body))
    escalation = Escalation.from_json(body)
    assert (escalation.appliance_id, escalation.site_id) == (APPLIANCE, SITE)
    assert escalation.log_index is None


@pytest.mark.parametrize(
    "name",
    [
        "certificate-envelope",
        "checkpoint-envelope",
        "config-bundle-envelope",
        "enrollment-body",
        "sync-request",
        "audit-export",
        "evidence-export",
        "auditor-package",
        "central-log-export",
        "central-record-proof",
    ],
)
def test_indented_examples_keep_jcs_member_order(name: str) -> None:
    text = examples()[name]
    assert (
        canonicalize(json.loads(text))
        == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False).encode()
    )
