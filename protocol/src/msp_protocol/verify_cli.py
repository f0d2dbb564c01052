"""msp-verify: an auditor's offline check of what an appliance exported.

::

    msp-verify --central-key HEX [--json] [--at TIME] FILE
    msp-verify --central-key-file central.pub --certificate certificate.json bundle.json

FILE is an audit export (``msp-agent audit export``), an evidence export, an
auditor package (a site's evidence for some frameworks over a period, from
the central server), the central server's own log (a central log export),
one record of it with its proof (a central record proof, as a partner gets
it), or a bare evidence bundle envelope (then ``--certificate`` names its
delegation certificate). The central server's public key is the only thing
trusted.

Exit status: 0 verified; 1 verification failed (one line per problem, naming
the first bad entry or document); 2 the command was used wrongly (no central key, a file
that cannot be read or is not JSON, a document of no known kind). Every
message is one line; there is no traceback.

This module is the one place in msp_protocol that reads files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from msp_protocol.canonical import parse_json
from msp_protocol.central_log import (
    CENTRAL_LOG_EXPORT_FORMAT,
    CentralLogReport,
    CentralRecordProof,
    CentralRecordReport,
    check_central_log_export,
    check_central_record_proof,
)
from msp_protocol.dsse import PayloadType, parse_envelope
from msp_protocol.encoding import format_time, parse_time, utc_now
from msp_protocol.errors import EncodingError, JSONError, MalformedError
from msp_protocol.export import (
    AUDIT_EXPORT_FORMAT,
    EVIDENCE_EXPORT_FORMAT,
    AuditExportReport,
    EvidenceExportReport,
    build_evidence_export,
    check_audit_export,
    check_evidence_export,
)
from msp_protocol.keys import VerifyKey
from msp_protocol.limits import DEFAULT_LIMITS, Limits
from msp_protocol.package import (
    AUDITOR_PACKAGE_FORMAT,
    AuditorPackageReport,
    check_auditor_package,
)
from msp_protocol.result import Failure

PROG = "msp-verify"
EXIT_VERIFIED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# A central record proof has no ``format`` member (docs/protocol.md §8.3), so
# it is recognised by its required members on an object with neither
# ``format`` nor ``payloadType``: every other kind has one of the two, so
# none passes for a record proof, nor a record proof for one of them. Extra
# members are then the strict parser's to refuse (exit 1), not a usage error.
RECORD_PROOF_MEMBERS: frozenset[str] = frozenset(
    name for name, field in CentralRecordProof.model_fields.items() if field.is_required()
)


class CommandLineError(Exception):
    """The command was used wrongly: exit 2 with this one-line message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the usage and the message on two lines and exits;
        # we want one line and our own exit path.
        raise CommandLineError(f"{message} (see {PROG} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "Verify an audit export, an evidence export, an auditor package, a central log "
            "export, a central record proof or an evidence bundle offline, with only the "
            "central server's public key."
        ),
        epilog="Exit status: 0 verified, 1 verification failed, 2 usage error.",
    )
    parser.add_argument("file", metavar="FILE", type=Path, help="the document to verify")
    parser.add_argument(
        "--central-key",
        metavar="HEX",
        action="append",
        default=[],
        help="the central server's Ed25519 public key, 64 hex characters (repeatable)",
    )
    parser.add_argument(
        "--central-key-file",
        metavar="PATH",
        type=Path,
        action="append",
        default=[],
        help="a file holding the central server's public key in hex (repeatable)",
    )
    parser.add_argument(
        "--certificate",
        metavar="FILE",
        type=Path,
        help="the delegation certificate, when FILE is a bare evidence bundle",
    )
    parser.add_argument(
        "--at",
        metavar="TIME",
        help="verify as of this RFC 3339 UTC time (default: now)",
    )
    parser.add_argument("--json", action="store_true", help="print a machine-readable report")
    return parser


@dataclass(frozen=True, slots=True)
class Outcome:
    # "audit-export", "evidence-export", "auditor-package", "central-log-export",
    # "central-record-proof" or "evidence-bundle"
    kind: str
    report: (
        AuditExportReport
        | EvidenceExportReport
        | AuditorPackageReport
        | CentralLogReport
        | CentralRecordReport
        | None
    )
    failures: tuple[Failure, ...]

    @property
    def verified(self) -> bool:
        return not self.failures


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``msp-verify``; returns the exit status."""
    try:
        return _run(argv)
    except CommandLineError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug of ours: still one line, never a traceback
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    limits = DEFAULT_LIMITS
    keys = _central_keys(args.central_key, args.central_key_file)
    at = _time(args.at) if args.at is not None else utc_now()
    data = _read(args.file, limits.max_export_bytes)
    try:
        if len(data) > limits.max_export_bytes:
            raise JSONError(f"{args.file} is larger than {limits.max_export_bytes} bytes")
        outcome = _verify(data, args, keys, at, limits)
    except MalformedError as exc:
        # JSON, but not JSON we accept (duplicate keys, too large, too deep):
        # a document that fails verification, not a misuse.
        outcome = Outcome("unknown", None, (exc,))
    if args.json:
        print(json.dumps(_machine_report(args.file, outcome), indent=2, sort_keys=True))
    else:
        print("\n".join(_human_report(args.file, outcome)))
    return EXIT_VERIFIED if outcome.verified else EXIT_FAILED


def _central_keys(hexes: Sequence[str], files: Sequence[Path]) -> list[VerifyKey]:
    texts = [(text, "--central-key") for text in hexes]
    texts.extend((_read(path, 1024).decode("ascii", "replace"), str(path)) for path in files)
    if not texts:
        raise CommandLineError(
            "a central public key is required (--central-key HEX or --central-key-file PATH)"
        )
    keys = []
    for text, source in texts:
        try:
            keys.append(VerifyKey.from_hex(text.strip()))
        except EncodingError:
            raise CommandLineError(
                f"{source}: not an Ed25519 public key in hex (64 lowercase hex characters)"
            ) from None
    return keys


def _time(text: str) -> datetime:
    try:
        return parse_time(text, what="--at")
    except EncodingError as exc:
        raise CommandLineError(str(exc)) from None


def _read(path: Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of the file: more than ``limit`` means
    too large, found without reading it all."""
    try:
        with path.open("rb") as file:
            return file.read(limit + 1)
    except OSError as exc:
        raise CommandLineError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse(data: bytes, path: Path, limits: Limits) -> Any:
    try:
        return parse_json(data, limits=limits, max_bytes=limits.max_export_bytes)
    except JSONError:
        try:
            json.loads(data)
        except (ValueError, RecursionError):
            raise CommandLineError(f"{path} is not a JSON document") from None
        raise  # JSON, but refused by the strict parser


def _verify(
    data: bytes, args: argparse.Namespace, keys: list[VerifyKey], at: datetime, limits: Limits
) -> Outcome:
    value = _parse(data, args.file, limits)
    tag = value.get("format") if isinstance(value, dict) else None
    payload_type = value.get("payloadType") if isinstance(value, dict) else None
    if args.certificate is not None and payload_type is None:
        raise CommandLineError("--certificate goes with a bare evidence bundle envelope only")
    if tag == AUDIT_EXPORT_FORMAT:
        audit = check_audit_export(value, keys, at=at, limits=limits)
        return Outcome("audit-export", audit.value, audit.failures)
    if tag == EVIDENCE_EXPORT_FORMAT:
        evidence = check_evidence_export(value, keys, at=at, limits=limits)
        return Outcome("evidence-export", evidence.value, evidence.failures)
    if tag == AUDITOR_PACKAGE_FORMAT:
        package = check_auditor_package(value, keys, at=at, limits=limits)
        return Outcome("auditor-package", package.value, package.failures)
    if tag == CENTRAL_LOG_EXPORT_FORMAT:
        central = check_central_log_export(value, keys, at=at, limits=limits)
        return Outcome("central-log-export", central.value, central.failures)
    if _is_record_proof(value):
        # The document gives a record proof no time check: --at plays no part.
        record = check_central_record_proof(value, keys, limits=limits)
        return Outcome("central-record-proof", record.value, record.failures)
    if payload_type == PayloadType.EVIDENCE.value:
        if args.certificate is None:
            raise CommandLineError(
                f"{args.file} is an evidence bundle: name its --certificate FILE"
            )
        certificate = _parse(
            _read(args.certificate, limits.max_json_bytes), args.certificate, limits
        )
        try:
            export = build_evidence_export(
                evidence=parse_envelope(value, limits=limits),
                certificate=parse_envelope(certificate, limits=limits),
            )
        except MalformedError as exc:
            return Outcome("evidence-bundle", None, (exc,))
        bundle = check_evidence_export(export, keys, at=at, limits=limits)
        return Outcome("evidence-bundle", bundle.value, bundle.failures)
    if isinstance(payload_type, str):
        raise CommandLineError(
            f"{args.file} is a signed {payload_type[:80]} document, not an evidence bundle"
        )
    raise CommandLineError(
        f"{args.file} is not an audit export, an evidence export, an auditor package, "
        "a central log export, a central record proof or an evidence bundle"
    )


def _is_record_proof(value: Any) -> bool:
    """An object with every member a record proof requires and neither of
    the members that mark the other kinds (see RECORD_PROOF_MEMBERS)."""
    return (
        isinstance(value, dict)
        and "format" not in value
        and "payloadType" not in value
        and value.keys() >= RECORD_PROOF_MEMBERS
    )


def _human_report(path: Path, outcome: Outcome) -> list[str]:
    report = outcome.report
    if isinstance(report, AuditExportReport):
        lines = _audit_lines(report, outcome.verified)
    elif isinstance(report, EvidenceExportReport):
        lines = _evidence_lines(report)
    elif isinstance(report, AuditorPackageReport):
        lines = _package_lines(report, outcome.verified)
    elif isinstance(report, CentralLogReport):
        lines = _central_log_lines(report, outcome.verified)
    elif isinstance(report, CentralRecordReport):
        lines = _central_record_lines(report, outcome.verified)
    else:
        lines = [f"{path}: NOT VERIFIED"]
    lines.extend(f"  {failure.code}: {failure}" for failure in outcome.failures)
    return lines


def _where(first_bad: int | None, bad_range: tuple[int, int] | None) -> str:
    """Where a log export went wrong: the entry proven bad, or the entries
    one of which changed when the export cannot tell which."""
    if first_bad is not None:
        return f" (first bad entry: {first_bad})"
    if bad_range is not None:
        return f" (a changed entry among {bad_range[0]}..{bad_range[1]})"
    return ""


def _audit_lines(report: AuditExportReport, verified: bool) -> list[str]:
    title = f"audit export of appliance {report.appliance_id}"
    if not verified:
        return [f"{title}: NOT VERIFIED{_where(report.first_bad_index, report.bad_range)}"]
    lines = [
        f"{title}: verified",
        f"  {_count(report.size, 'entry', 'entries')}, all covered by "
        f"{_count(report.checkpoints, 'signed checkpoint')}",
        f"  signing {_count(len(report.key_ids), 'key', 'keys', number=False)}: "
        f"{', '.join(report.key_ids)}, certified by the central server",
    ]
    if report.witnessed_size:
        unwitnessed = report.size - report.witnessed_size
        lines.append(
            f"  witnessed by the central server up to size {report.witnessed_size}"
            + (f" ({unwitnessed} later entries not yet witnessed)" if unwitnessed else "")
        )
    else:
        lines.append("  not witnessed: the export holds no receipt of the central server")
    if report.evidence:
        lines.append(f"  {_count(report.evidence, 'evidence bundle')}, each recorded in the log")
    if report.signed_after_expiry:
        sizes = ", ".join(str(size) for size in report.signed_after_expiry)
        lines.append(
            f"  review: {_count(len(report.signed_after_expiry), 'checkpoint')} signed after "
            f"the signing key's certificate expired (sizes {sizes})"
        )
    return lines


def _count(count: int, one: str, many: str | None = None, *, number: bool = True) -> str:
    noun = one if count == 1 else (many or one + "s")
    return f"{count} {noun}" if number else noun


def _evidence_lines(report: EvidenceExportReport) -> list[str]:
    lines = [
        f"evidence bundle {report.bundle_id} of appliance {report.appliance_id}, "
        f"site {report.site_id}: signature verified",
        f"  check {report.check_id}: {report.result}; signed by key {report.key_id} "
        f"under certificate {report.certificate_serial}",
    ]
    if report.proven_in_log:
        lines.append(
            f"  proven at log index {report.log_index} of the log the central server "
            f"witnessed up to size {report.witnessed_size}"
        )
    else:
        lines.append(
            f"  not yet proven in a witnessed log (claims log index {report.log_index}; "
            "an evidence export with a log proof shows it)"
        )
    if report.signed_after_expiry:
        lines.append("  review: collected after its certificate expired")
    return lines


def _package_lines(report: AuditorPackageReport, verified: bool) -> list[str]:
    title = (
        f"auditor package of site {report.site_id} ({', '.join(report.frameworks)}), "
        f"{format_time(report.period_start)} to {format_time(report.period_end)}"
    )
    if not verified:
        return [f"{title}: NOT VERIFIED"]
    lines = [f"{title}: verified"]
    for segment in report.segments:
        witnessed = (
            f", witnessed {format_time(segment.witnessed_at)}" if segment.witnessed_at else ""
        )
        lines.append(
            f"  appliance {segment.appliance_id}"
            + (f" (log generation {segment.generation})" if segment.generation > 1 else "")
            + f": entries {segment.start}..{segment.size - 1} "
            f"signed by {', '.join(segment.key_ids)}{witnessed}"
        )
    lines.append(
        f"  {_count(report.bundles, 'evidence bundle')}, each recorded in its appliance's "
        "witnessed log"
    )
    states = ", ".join(f"{count} {state}" for state, count in sorted(report.states.items()))
    lines.append(
        f"  summary of {_count(len(report.controls), 'control')} recomputed and matching"
        + (f": {states}" if states else "")
    )
    if report.signed_after_expiry:
        lines.append(
            f"  review: {_count(len(report.signed_after_expiry), 'bundle')} collected after "
            f"the signing key's certificate expired ({', '.join(report.signed_after_expiry)})"
        )
    late = [
        segment.appliance_id
        for segment in report.segments
        if segment.checkpoint_signed_after_expiry
    ]
    if late:
        lines.append(
            f"  review: the checkpoint of {', '.join(late)} was signed after the signing "
            "key's certificate expired"
        )
    if report.omitted_bundles:
        lines.append(
            "  review: bundles recorded in the logs shown during the period but not in the "
            f"package: {report.omitted_bundles} (of other frameworks, or left out)"
        )
    if report.unwitnessed_bundles:
        lines.append(
            f"  not verifiable: the server reports {report.unwitnessed_bundles} more "
            "bundles of the period it cannot prove yet (not yet witnessed)"
        )
    return lines


def _central_log_lines(report: CentralLogReport, verified: bool) -> list[str]:
    title = "central log export" + (f" of key {report.key_id}" if report.key_id else "")
    if not verified:
        return [f"{title}: NOT VERIFIED{_where(report.first_bad_index, report.bad_range)}"]
    checkpoint_ts = format_time(report.checkpoint_ts) if report.checkpoint_ts else "?"
    kinds = ", ".join(f"{kind} {count}" for kind, count in report.kinds.items())
    return [
        f"{title}: verified",
        f"  {_count(report.size, 'entry', 'entries')}, all covered by the checkpoint the "
        f"central key signed at {checkpoint_ts}",
        f"  by kind: {kinds}",
    ]


def _central_record_lines(report: CentralRecordReport, verified: bool) -> list[str]:
    title = "central record proof" + (f" of key {report.key_id}" if report.key_id else "")
    if not verified:
        return [f"{title}: NOT VERIFIED"]
    entry = report.entry
    checkpoint_ts = format_time(report.checkpoint_ts) if report.checkpoint_ts else "?"
    size = report.checkpoint_size or 0
    # ASCII-escaped: the data is the server's free-form JSON, printed on a
    # terminal.
    data = json.dumps(entry.data, sort_keys=True, separators=(",", ":"))
    return [
        f"{title}: verified",
        f"  entry {entry.index}, included in the log of {_count(size, 'entry', 'entries')} "
        f"the central key signed at {checkpoint_ts}",
        f"  {entry.kind} by {entry.actor} at {format_time(entry.ts)}",
        f"  data: {data}",
    ]


def _machine_report(path: Path, outcome: Outcome) -> dict[str, Any]:
    return {
        "file": str(path),
        "kind": outcome.kind,
        "verified": outcome.verified,
        "report": outcome.report.as_dict() if outcome.report is not None else None,
        "problems": [
            {"code": failure.code, "message": str(failure)} for failure in outcome.failures
        ],
    }


if __name__ == "__main__":
    sys.exit(main())
