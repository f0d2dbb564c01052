"""Throughput of the protocol's hot paths, each against a baseline measured in
the same run (the machine is shared and noisy: compare only within one run).

    uv run python bench/protocol_bench.py [--quick]

Prints ``figure=value unit`` lines. The ratio lines say how close each
operation comes to the primitive it cannot avoid (an Ed25519 verify, a
SHA-256), or how much faster the canonical encoder is than the reference one.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import nacl.signing
import rfc8785

from msp_protocol.canonical import canonicalize
from msp_protocol.delegation import Scope, issue_delegation, verify_delegation
from msp_protocol.dsse import pae
from msp_protocol.keys import SigningKey
from msp_protocol.log import check_checkpoint, make_checkpoint, make_entry, parse_entry
from msp_protocol.merkle import (
    LeafHashTree,
    TreeState,
    check_inclusion,
    inclusion_proof,
    leaf_hash,
    node_hash,
)

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def rate(operation: Callable[[], object], seconds: float, repeats: int) -> float:
    """Median calls per second over ``repeats`` runs of about ``seconds`` each."""
    rates = []
    for _ in range(repeats):
        calls = 0
        start = time.perf_counter()
        deadline = start + seconds
        while (now := time.perf_counter()) < deadline:
            for _ in range(16):
                operation()
            calls += 16
        rates.append(calls / (now - start))
    return statistics.median(rates)


def report(name: str, value: float, unit: str) -> None:
    print(f"{name}={value:.2f} {unit}" if unit == "ratio" else f"{name}={value:.0f} {unit}")


def entry_data(n: int) -> dict[str, object]:
    # A typical L1-action entry: ten fields of strings, booleans and integers.
    return {
        "action": "restart-timesyncd",
        "runbook": "ntp-sync",
        "result": "ok",
        "exit_code": 0,
        "duration_ms": 412,
        "attempt": n,
        "unit": "systemd-timesyncd.service",
        "changed": True,
        "check_id": "time-sync",
        "operator": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    args = parser.parse_args()
    started = time.perf_counter()
    period = 0.02 if args.quick else 0.25
    repeats = 3 if args.quick else 7

    # --- canonical encoding -------------------------------------------------------
    entry = make_entry(7, NOW, "l1.action", "runbook:ntp-sync", entry_data(7)).entry.to_wire()
    reference = rate(lambda: rfc8785.dumps(entry), period, repeats)
    ours = rate(lambda: canonicalize(entry), period, repeats)
    report("canonical_encode_rfc8785", reference, "entries/s")
    report("canonical_encode", ours, "entries/s")
    report("canonical_encode_speedup", ours / reference, "ratio")
    with_float = {**entry, "data": {**entry_data(1), "offset_ms": 1.25}}
    report(
        "canonical_encode_with_float",
        rate(lambda: canonicalize(with_float), period, repeats),
        "entries/s",
    )

    # --- leaf hashing ----------------------------------------------------------------
    raw = make_entry(7, NOW, "l1.action", "runbook:ntp-sync", entry_data(7)).raw
    sha = rate(lambda: hashlib.sha256(raw).digest(), period, repeats)
    leaf = rate(lambda: leaf_hash(raw), period, repeats)
    report("sha256_baseline", sha, f"hashes/s ({len(raw)} B)")
    report("leaf_hash", leaf, "leaves/s")
    report("leaf_hash_vs_sha256", leaf / sha, "ratio")

    # --- strict entry parse (what ingest and verify do per entry) ----------------------
    report(
        "parse_entry_canonical_checked",
        rate(lambda: parse_entry(raw), period, repeats),
        "entries/s",
    )
    report(
        "parse_entry_unchecked",
        rate(lambda: parse_entry(raw, require_canonical=False), period, repeats),
        "entries/s",
    )

    # --- tree append ----------------------------------------------------------------------
    leaves = [leaf_hash(i.to_bytes(8, "big")) for i in range(1_000 if args.quick else 20_000)]

    def append_all() -> None:
        state = TreeState()
        for item in leaves:
            state.append(item)

    appends = rate(append_all, period, repeats) * len(leaves)
    report("tree_append", appends, "leaves/s")

    # --- inclusion proof verification (2**16 leaves: 16 hashes) --------------
    size = 1 << 12 if args.quick else 1 << 16
    many = [leaf_hash(i.to_bytes(8, "big")) for i in range(size)]
    tree = LeafHashTree(many)
    index = size * 3 // 4 - 1
    proof = inclusion_proof(index, size, tree)
    root = tree.root()
    baseline_nodes = rate(lambda: [node_hash(p, p) for p in proof], period, repeats)
    inclusion = rate(
        lambda: check_inclusion(many[index], index, size, proof, root), period, repeats
    )
    report("inclusion_verify", inclusion, f"proofs/s ({len(proof)} hashes)")
    report("inclusion_verify_vs_bare_hashing", inclusion / baseline_nodes, "ratio")

    # --- checkpoint verification ----------------------------------------------------------
    root_key, device = SigningKey(b"\x01" * 32), SigningKey(b"\x02" * 32)
    delegation = verify_delegation(
        issue_delegation(
            root_key,
            subject=device.verify_key,
            appliance_id="appliance-1",
            site_id="site-1",
            scopes=[Scope.AUDIT],
            not_before=NOW,
        ),
        roots=[root_key.verify_key],
        at=NOW,
    )
    state = TreeState()
    state.extend(many[:1000])
    checkpoint = make_checkpoint(device, appliance_id="appliance-1", state=state, ts=NOW)
    message = pae(checkpoint.payloadType, checkpoint.payload_bytes())
    signature = device.sign(message)
    nacl_key = nacl.signing.VerifyKey(device.verify_key.raw)
    raw_verify = rate(lambda: nacl_key.verify(message, signature), period, repeats)
    verify = rate(lambda: check_checkpoint(checkpoint, delegation=delegation), period, repeats)
    report("ed25519_verify_baseline", raw_verify, "verifies/s")
    report("checkpoint_verify", verify, "checkpoints/s")
    report("checkpoint_verify_vs_ed25519", verify / raw_verify, "ratio")
    print(f"elapsed={time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
