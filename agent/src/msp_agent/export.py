"""What the appliance hands an auditor, and its own checks of evidence.

``msp-agent audit export`` writes the whole audit trail with everything
needed to verify it offline with only the central server's public key
(``msp-verify``): the entries' exact bytes, the signed checkpoints, the
certificates of every key that signed, the server's receipts, the latest
revocation list and the evidence bundles the appliance holds: those the
server acknowledged (kept within the evidence quota) and those still waiting.

Both commands read the databases through read-only connections, so they run
beside the service without stopping it.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

from msp_agent.audit import AuditTrailError, _Subtrees
from msp_agent.files import write_atomic
from msp_agent.runtime import load_revocations_file
from msp_agent.store import connect
from msp_protocol.delegation import check_delegation
from msp_protocol.dsse import Envelope, parse_envelope
from msp_protocol.encoding import utc_now
from msp_protocol.errors import ProtocolError
from msp_protocol.evidence import (
    EvidenceProof,
    check_evidence,
    check_evidence_in_log,
    recorded_evidence,
)
from msp_protocol.export import build_audit_export, check_audit_export, parse_evidence_export
from msp_protocol.keys import VerifyKey
from msp_protocol.log import GenesisData, parse_entry
from msp_protocol.merkle import inclusion_proof


class ExportError(Exception):
    pass


def _open(state_dir: Path) -> sqlite3.Connection:
    database = state_dir / "audit.sqlite"
    try:
        database.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ExportError(f"no audit trail at {database}") from None
    except OSError as exc:
        raise ExportError(f"cannot read {database}: {exc.strerror}") from None
    try:
        return connect(database, readonly=True)
    except sqlite3.Error as exc:
        raise ExportError(f"cannot open {database}: {exc}") from None


def export_audit(
    state_dir: Path, out: Path, *, central_key: VerifyKey, now: datetime | None = None
) -> str:
    """Write the audit export to ``out`` and return a one-line summary. The
    export is checked with the protocol's own verifier (what ``msp-verify``
    runs); one that does not verify is written all the same and raises
    :class:`ExportError` naming why, so the command exits non-zero."""
    connection = _open(state_dir)
    try:
        connection.execute("BEGIN")  # one snapshot of a log that keeps growing
        entries = [bytes(r[0]) for r in connection.execute("SELECT raw FROM entries ORDER BY idx")]
        checkpoints = _envelopes(
            connection, "checkpoint", "SELECT size, envelope FROM checkpoints ORDER BY size"
        )
        receipts = _envelopes(
            connection, "receipt", "SELECT size, envelope FROM receipts ORDER BY size"
        )
        certificates = _envelopes(
            connection, "certificate", "SELECT serial, envelope FROM certificates ORDER BY rowid"
        )
        evidence = _envelopes(
            connection,
            "evidence bundle",
            "SELECT bundle_id, envelope FROM evidence ORDER BY log_index",
        )
        connection.execute("COMMIT")
    except sqlite3.Error as exc:
        raise ExportError(f"cannot read the audit trail: {exc}") from None
    finally:
        connection.close()
    if not entries:
        raise ExportError("the audit trail is empty")
    try:
        appliance_id = GenesisData.from_wire(parse_entry(entries[0], expected_index=0).entry.data)
    except ProtocolError as exc:
        raise ExportError(f"entry 0 is not this log's genesis: {exc}") from None
    revocations = load_revocations_file(state_dir)
    at = now or utc_now()
    try:
        document = build_audit_export(
            appliance_id=appliance_id.appliance_id,
            entries=entries,
            checkpoints=checkpoints,
            certificates=certificates,
            receipts=receipts,
            revocations=revocations,
            evidence=evidence,
            exported_at=at,
        )
    except ProtocolError as exc:
        raise ExportError(f"the audit trail is damaged, not exported: {exc}") from None
    checked = check_audit_export(document, [central_key], at=at)
    if out.is_dir():
        raise ExportError(f"cannot write {out}: it is a directory")
    try:
        write_atomic(out, document, mode=0o640)
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
    if not checked.ok:
        # Written all the same: a log that does not verify (tampered, signed
        # past a revocation) is exactly what an auditor must be able to see.
        raise ExportError(f"exported to {out}, but it does NOT verify: {checked.describe()}")
    report = checked.unwrap()
    return (
        f"exported {report.size} entries, {report.checkpoints} checkpoints, "
        f"witnessed up to {report.witnessed_size}, {report.evidence} evidence bundle(s) to {out}"
    )


def _envelopes(connection: sqlite3.Connection, what: str, query: str) -> list[Envelope]:
    """The envelopes ``query`` selects (``key, envelope`` rows); a damaged one
    is an :class:`ExportError` naming it."""
    envelopes = []
    for key, data in connection.execute(query):
        try:
            envelopes.append(parse_envelope(bytes(data)))
        except ProtocolError as exc:
            raise ExportError(
                f"the audit trail is damaged, not exported: {what} {key}: {exc}"
            ) from None
    return envelopes


def verify_evidence_file(state_dir: Path, path: Path, central_key: VerifyKey) -> str:
    """Check an evidence bundle (a DSSE envelope, or an evidence export)
    against this appliance's certificates and audit log; return a summary or
    raise :class:`ExportError` naming what does not hold.

    (1) the bundle is signed under a certificate the central server issued to
        this appliance;
    (2) the audit entry at its ``log_index`` records exactly this bundle;
    (3) where the server has cosigned a tree that covers that entry, the
        entry is proven included in it.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror}") from None
    try:
        envelope = parse_envelope(data)
    except ProtocolError:
        try:
            envelope = parse_evidence_export(data).evidence
        except ProtocolError as exc:
            raise ExportError(
                f"{path} is neither an evidence bundle nor an evidence export: {exc}"
            ) from None
    connection = _open(state_dir)
    try:
        keyid = envelope.signatures[0].keyid
        rows = connection.execute(
            "SELECT envelope FROM certificates WHERE key_id = ? ORDER BY rowid DESC", (keyid,)
        ).fetchall()
        if not rows:
            raise ExportError(f"no certificate of this appliance for key {keyid}")
        certificate = check_delegation(
            parse_envelope(bytes(rows[0][0])), roots=[central_key], at=utc_now(), allow_expired=True
        )
        if not certificate.ok:
            raise ExportError(f"the signer's certificate does not verify: {certificate.describe()}")
        verified = check_evidence(envelope, delegation=certificate.unwrap())  # (1)
        if not verified.ok:
            raise ExportError(f"evidence does NOT verify: {verified.describe()}")
        evidence = verified.unwrap()
        index = evidence.bundle.log_index
        row = connection.execute("SELECT raw FROM entries WHERE idx = ?", (index,)).fetchone()
        if row is None:
            raise ExportError(f"this appliance's log has no entry {index}")
        entry = bytes(row[0])
        try:
            data_of_entry = recorded_evidence(parse_entry(entry, expected_index=index).entry)
        except ProtocolError as exc:
            raise ExportError(f"evidence does NOT verify: {exc}") from None
        if (
            data_of_entry.bundle_id != evidence.bundle.bundle_id
            or data_of_entry.payload_sha256 != evidence.digest
        ):  # (2)
            raise ExportError(f"evidence does NOT verify: log entry {index} records another bundle")
        receipt = connection.execute(
            "SELECT size, envelope FROM receipts WHERE size > ? ORDER BY size DESC LIMIT 1",
            (index,),
        ).fetchone()
        witnessed = ""
        if receipt is not None:  # (3)
            size, receipt_envelope = int(receipt[0]), parse_envelope(bytes(receipt[1]))
            proof = EvidenceProof(
                entry, inclusion_proof(index, size, _Subtrees(connection)), receipt_envelope
            )
            included = check_evidence_in_log(evidence, proof, roots=[central_key])
            if not included.ok:
                raise ExportError(f"evidence does NOT verify: {included.describe()}")
            witnessed = f", witnessed by the central server in a log of {size}"
        else:
            witnessed = ", not yet witnessed by the central server"
    except (sqlite3.Error, AuditTrailError, ProtocolError) as exc:
        raise ExportError(f"cannot read the audit trail: {exc}") from None
    finally:
        connection.close()
    bundle = evidence.bundle
    return (
        f"ok: bundle {bundle.bundle_id} ({bundle.check_id}: {bundle.result}) "
        f"recorded at log index {index}{witnessed}"
    )
