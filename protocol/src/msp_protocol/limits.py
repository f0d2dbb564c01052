"""Every bound the protocol enforces, in one place.

A verifier that does not bound its input can be made to spend unbounded time or
memory by whoever sends it data. Each limit below says why it has its value.
Tests that need other values build their own ``Limits(...)``; nothing reads a
global that a test could forget to reset.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from msp_protocol.errors import UsageError


@dataclass(frozen=True, slots=True)
class Limits:
    # Untrusted JSON documents (one request body, one signed payload). An audit
    # batch of 1,000 entries of a few hundred bytes, base64-encoded, fits with
    # room to spare; anything larger is a bug or an attack.
    max_json_bytes: int = 8 * 1024 * 1024
    # Nesting depth of untrusted JSON. Our documents nest at most 5 deep; the
    # free-form parts (observed values of a check, entry data) get some room.
    max_json_depth: int = 32

    # One canonical audit-log entry. A check result worth more than this belongs
    # in an evidence bundle that the entry refers to by hash.
    max_entry_bytes: int = 64 * 1024
    # One evidence bundle payload (the observed values of one check).
    max_evidence_bytes: int = 1024 * 1024

    # Signatures on one DSSE envelope: a rotation carries two (old key, new key);
    # more than a handful is only ever an attempt to make us verify in a loop.
    max_envelope_signatures: int = 4

    # A Merkle proof over a tree of fewer than 2**63 leaves has at most 63 hashes
    # (inclusion) or 2 * 63 (consistency).
    max_tree_size: int = 2**63 - 1
    max_inclusion_proof_hashes: int = 63
    max_consistency_proof_hashes: int = 126

    # Delegation certificates. A certificate valid forever is an error; 90 days
    # is three times the default lifetime, so an operator can stretch it but not
    # forget it.
    max_certificate_lifetime: timedelta = timedelta(days=90)
    max_scopes: int = 8

    # RFC 9421 request signatures: older than this, a signature is refused (the
    # nonce store only has to remember this long).
    max_signature_age: timedelta = timedelta(minutes=5)
    # Tolerated clock difference for anything dated in the future by the signer.
    clock_skew: timedelta = timedelta(seconds=60)
    # Signature-Input / Signature / Content-Digest header values.
    max_signature_header_bytes: int = 4096
    max_covered_components: int = 16

    # Revocation list entries: a fleet of thousands revoking a few a day.
    max_revocations: int = 100_000

    # An audit export (``msp-agent audit export``): a whole log, verified
    # offline. It is not a request body, so max_json_bytes does not apply: a
    # million entries of a few hundred bytes, base64-encoded, with their
    # checkpoints, receipts and evidence bundles, fit in 1 GiB.
    max_export_bytes: int = 1024 * 1024 * 1024
    # Entries in one export (years of an appliance's log). It bounds each list
    # of signed documents in the export too: none can usefully outnumber the
    # entries (checkpoint sizes ascend, each bundle has its own entry), and
    # each costs an Ed25519 verification.
    max_export_entries: int = 1_000_000
    # An auditor package (a site's evidence for a period) bounds its entries,
    # bundles, certificates and summary controls with max_export_entries and
    # max_export_bytes too: 90 days of a busy site is some 100,000 bundles in
    # 300,000 entries. Its log segments, one per appliance of the site: a
    # site has a handful of appliances, a campus perhaps a hundred.
    max_package_appliances: int = 1_000

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, int) and value <= 0:
                raise UsageError(f"limit {name} must be positive, got {value}")
            if isinstance(value, timedelta) and value <= timedelta(0):
                raise UsageError(f"limit {name} must be positive, got {value}")


DEFAULT_LIMITS = Limits()
