"""Tests of ``msp_protocol.merkle`` against a separate, deliberately naive RFC 6962.

The reference below (``ref_mth``, ``ref_path``, ``ref_proof``) is RFC 6962 §2.1 written
out as the recursive definitions over a list of leaf data, with ``hashlib`` and nothing
from the code under test. It is pinned to the published Certificate Transparency test
vectors, then every proof ``merkle.py`` generates for every tree up to 256 leaves is
compared with it, verified, and mutated in every way that must make it fail.

The exhaustive loops run inside a few tests (parametrising 30k+ cases is slow) and
collect failures, naming the first failing case in the assertion message.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msp_protocol.errors import (
    ConsistencyProofError,
    InclusionProofError,
    UsageError,
)
from msp_protocol.limits import Limits
from msp_protocol.merkle import (
    EMPTY_ROOT,
    LeafHashTree,
    TreeState,
    check_consistency,
    check_inclusion,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)
from msp_protocol.result import Result

# --- the naive reference: RFC 6962 §2.1, by its recursive definitions ------------------


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1), found by counting up."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


@functools.cache
def ref_mth(d: tuple[bytes, ...]) -> bytes:
    """MTH(D[n]). Cached by the leaf data itself, so it stays a pure function of ``d``."""
    n = len(d)
    if n == 0:
        return _sha256(b"")
    if n == 1:
        return _sha256(b"\x00" + d[0])
    k = _split(n)
    return _sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:]))


def ref_path(m: int, d: tuple[bytes, ...]) -> list[bytes]:
    """PATH(m, D[n]) of §2.1.1."""
    n = len(d)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: tuple[bytes, ...], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) of §2.1.2."""
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = _split(n)
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


def ref_proof(m: int, d: tuple[bytes, ...]) -> list[bytes]:
    """PROOF(m, D[n]) of §2.1.2, defined for 0 < m < n."""
    assert 0 < m < len(d)
    return ref_subproof(m, d, True)


# --- the data every exhaustive test shares ---------------------------------------------

MAX_SIZE = 256  # every (index, size) and (old, new) pair up to this size is checked
ALL_BITS_MAX_SIZE = 16  # up to this size, every bit of every hash is flipped
TREE_STATE_MAX_SIZE = 300

# Distinct leaves (equal neighbours would make some index mutations verify legitimately).
LEAF_DATA: tuple[bytes, ...] = tuple(
    f"leaf {i}".encode() if i else b"" for i in range(TREE_STATE_MAX_SIZE + 2)
)
LEAF_HASHES: tuple[bytes, ...] = tuple(_sha256(b"\x00" + d) for d in LEAF_DATA)
EXTRA_HASH = _sha256(b"a hash that belongs to no tree here")


@functools.cache
def ref_root(n: int) -> bytes:
    return ref_mth(LEAF_DATA[:n])


@functools.cache
def tree(n: int) -> LeafHashTree:
    """merkle.py's in-memory source over exactly n leaves: a proof that reads past its
    size raises UsageError instead of silently reading a later leaf."""
    return LeafHashTree(LEAF_HASHES[:n])


def flip(h: bytes, bit: int) -> bytes:
    return (int.from_bytes(h, "big") ^ (1 << bit)).to_bytes(len(h), "big")


def sampled_bit(i: int, j: int, size: int) -> int:
    """The one bit flipped in hash j of the proof for pair (i, size) when not all are.

    Over all pairs up to 256 this reaches every one of the 256 bit positions (``size``
    alone runs through 1..256); the tests assert that they did.
    """
    return (i * 31 + j * 7 + size) % 256


def _fail_report(failures: Sequence[str], checked: int) -> str:
    return f"{len(failures)} of {checked} cases failed; first: {failures[0]}"


# --- the reference is RFC 6962 ---------------------------------------------------------

# Certificate Transparency's published vectors (transparency-dev/merkle testonly).
CT_LEAVES: tuple[bytes, ...] = tuple(
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
)
CT_ROOTS = (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)
CT_INCLUSION = {
    (0, 8): (
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ),
    (5, 8): (
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ),
}
CT_CONSISTENCY = {
    (2, 8): (
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ),
    (6, 8): (
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ),
}


def test_reference_and_merkle_match_the_rfc6962_test_vectors() -> None:
    ct_hashes = [leaf_hash(d) for d in CT_LEAVES]
    for n, expected in enumerate(CT_ROOTS):
        assert ref_mth(CT_LEAVES[:n]).hex() == expected, f"reference root of size {n}"
        assert root_of(ct_hashes[:n]).hex() == expected, f"root_of size {n}"
        assert LeafHashTree(ct_hashes[:n]).root().hex() == expected, f"LeafHashTree size {n}"
    source = LeafHashTree(ct_hashes)
    root8 = bytes.fromhex(CT_ROOTS[8])
    for (index, size), hexes in CT_INCLUSION.items():
        expected_path = [bytes.fromhex(h) for h in hexes]
        assert ref_path(index, CT_LEAVES[:size]) == expected_path
        assert inclusion_proof(index, size, source) == expected_path
        assert check_inclusion(ct_hashes[index], index, size, expected_path, root8).ok
    for (old, new), hexes in CT_CONSISTENCY.items():
        expected_proof = [bytes.fromhex(h) for h in hexes]
        assert ref_proof(old, CT_LEAVES[:new]) == expected_proof
        assert consistency_proof(old, new, source) == expected_proof
        old_root = bytes.fromhex(CT_ROOTS[old])
        assert check_consistency(old, new, old_root, root8, expected_proof).ok


def test_leaf_and_node_hashes_are_domain_separated_sha256() -> None:
    assert leaf_hash(b"abc") == _sha256(b"\x00abc")
    assert node_hash(b"L" * 32, b"R" * 32) == _sha256(b"\x01" + b"L" * 32 + b"R" * 32)
    assert node_hash(b"L" * 32, b"R" * 32) != node_hash(b"R" * 32, b"L" * 32)
    # A leaf is never mistaken for the node over the same 64 bytes.
    assert leaf_hash(b"L" * 32 + b"R" * 32) != node_hash(b"L" * 32, b"R" * 32)


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    empty = _sha256(b"")
    assert empty.hex() == CT_ROOTS[0]
    assert empty == EMPTY_ROOT
    assert ref_mth(()) == empty
    assert root_of([]) == empty
    assert LeafHashTree([]).root() == empty
    assert TreeState().root() == empty


def test_roots_match_the_reference_for_every_size() -> None:
    failures = []
    for n in range(TREE_STATE_MAX_SIZE + 1):
        expected = ref_root(n)
        if root_of(LEAF_HASHES[:n]) != expected:
            failures.append(f"root_of size {n}")
        if LeafHashTree(LEAF_HASHES[:n]).root() != expected:
            failures.append(f"LeafHashTree.root size {n}")
        if n and tree(TREE_STATE_MAX_SIZE)(0, n) != expected:
            failures.append(f"LeafHashTree({TREE_STATE_MAX_SIZE} leaves)(0, {n})")
    assert not failures, _fail_report(failures, TREE_STATE_MAX_SIZE + 1)


# --- every valid proof up to 256 leaves: equal to the reference, and verifies -----------


def test_every_inclusion_proof_equals_the_reference_path_and_verifies() -> None:
    failures: list[str] = []
    checked = 0
    for size in range(1, MAX_SIZE + 1):
        data, root, source = LEAF_DATA[:size], ref_root(size), tree(size)
        for index in range(size):
            checked += 1
            case = f"index {index}, size {size}"
            proof = inclusion_proof(index, size, source)
            if proof != ref_path(index, data):
                failures.append(f"{case}: proof differs from the reference PATH")
            result = check_inclusion(LEAF_HASHES[index], index, size, proof, root)
            if not result.ok:
                failures.append(f"{case}: does not verify: {result.describe()}")
    assert checked == MAX_SIZE * (MAX_SIZE + 1) // 2
    assert not failures, _fail_report(failures, checked)


def test_every_consistency_proof_equals_the_reference_proof_and_verifies() -> None:
    failures: list[str] = []
    checked = 0
    for new in range(1, MAX_SIZE + 1):
        data, new_root, source = LEAF_DATA[:new], ref_root(new), tree(new)
        for old in range(1, new + 1):
            checked += 1
            case = f"old {old}, new {new}"
            proof = consistency_proof(old, new, source)
            expected = ref_proof(old, data) if old < new else []
            if proof != expected:
                failures.append(f"{case}: proof differs from the reference PROOF")
            result = check_consistency(old, new, ref_root(old), new_root, proof)
            if not result.ok:
                failures.append(f"{case}: does not verify: {result.describe()}")
    assert checked == MAX_SIZE * (MAX_SIZE + 1) // 2
    assert not failures, _fail_report(failures, checked)


def test_consistency_from_the_empty_tree_and_between_equal_sizes() -> None:
    source = tree(MAX_SIZE)
    for n in range(MAX_SIZE + 1):
        assert consistency_proof(0, n, source) == [], f"0 -> {n}"
        assert consistency_proof(n, n, source) == [], f"{n} -> {n}"
        assert check_consistency(0, n, EMPTY_ROOT, ref_root(n), []).ok, f"0 -> {n}"
        assert check_consistency(n, n, ref_root(n), ref_root(n), []).ok, f"{n} -> {n}"


# --- every mutation of a valid proof fails ---------------------------------------------
#
# Flipping all 256 bits of every hash of every proof up to 256 leaves would be tens of
# millions of verifications, far too slow. So:
# - for all pairs with size <= 16, every bit of every hash is flipped: each proof hash,
#   the leaf hash (inclusion), the root(s);
# - for all pairs up to 256, one bit of each proof hash and of the leaf hash is flipped,
#   at position sampled_bit(i, j, size) = (i*31 + j*7 + size) % 256, where i is the
#   index (old size for consistency) and j the hash's position; the tests assert that
#   every one of the 256 positions was exercised.
# The structural mutations run for every pair up to 256: index (old size) +-1, size
# (new size) *2 and //2, a hash appended, the last hash removed, another root (the root
# of another size; for consistency also old and new roots swapped). Up to 64 leaves,
# more of them: a hash prepended, each hash removed or duplicated, the proof reversed.

Inclusion = tuple[bytes, int, int, list[bytes], bytes]  # leaf, index, size, proof, root
Consistency = tuple[int, int, bytes, bytes, list[bytes]]  # old, new, old root, new root, proof
BitChoice = Callable[[int], Iterable[int]]  # hash position j -> the bits to flip in it
THOROUGH_MAX_SIZE = 64


def all_bits(_j: int) -> range:
    return range(256)


def _sampled_bits(i: int, size: int, hashes: int, positions: set[int]) -> BitChoice:
    """One bit in each of the first ``hashes`` hashes, none in the others."""

    def choose(j: int) -> tuple[int, ...]:
        if j >= hashes:
            return ()
        bit = sampled_bit(i, j, size)
        positions.add(bit)
        return (bit,)

    return choose


def inclusion_mutations(
    leaf: bytes, index: int, size: int, proof: list[bytes], root: bytes, *, bits: BitChoice
) -> Iterator[tuple[str, Inclusion]]:
    """Bit flips chosen by ``bits(j)`` in hash j: the proof's hashes are 0..len-1, then
    the leaf hash, then the root. Then the structural mutations."""
    for j, h in enumerate(proof):
        for bit in bits(j):
            flipped = [*proof[:j], flip(h, bit), *proof[j + 1 :]]
            yield f"bit {bit} of hash {j}", (leaf, index, size, flipped, root)
    for bit in bits(len(proof)):
        yield f"bit {bit} of the leaf hash", (flip(leaf, bit), index, size, proof, root)
    for bit in bits(len(proof) + 1):
        yield f"bit {bit} of the root", (leaf, index, size, proof, flip(root, bit))

    yield "index - 1", (leaf, index - 1, size, proof, root)
    yield "index + 1", (leaf, index + 1, size, proof, root)
    yield "size * 2", (leaf, index, size * 2, proof, root)
    yield "size // 2", (leaf, index, size // 2, proof, root)
    yield "hash appended", (leaf, index, size, [*proof, EXTRA_HASH], root)
    if proof:
        yield "last hash removed", (leaf, index, size, proof[:-1], root)
    yield "root of size - 1", (leaf, index, size, proof, ref_root(size - 1))
    if size > THOROUGH_MAX_SIZE:
        return
    yield "root of size + 1", (leaf, index, size, proof, ref_root(size + 1))
    yield "hash prepended", (leaf, index, size, [EXTRA_HASH, *proof], root)
    yield "leaf hash appended", (leaf, index, size, [*proof, leaf], root)
    for j in range(len(proof)):
        yield f"hash {j} removed", (leaf, index, size, proof[:j] + proof[j + 1 :], root)
        yield f"hash {j} duplicated", (leaf, index, size, proof[: j + 1] + proof[j:], root)
    if len(proof) > 1:
        yield "proof reversed", (leaf, index, size, proof[::-1], root)
    yield "another leaf", (LEAF_HASHES[size], index, size, proof, root)


def consistency_mutations(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: list[bytes], *, bits: BitChoice
) -> Iterator[tuple[str, Consistency]]:
    """Bit flips chosen by ``bits(j)`` in hash j: the proof's hashes are 0..len-1, then
    the old root, then the new root. Then the structural mutations."""
    for j, h in enumerate(proof):
        for bit in bits(j):
            flipped = [*proof[:j], flip(h, bit), *proof[j + 1 :]]
            yield f"bit {bit} of hash {j}", (old, new, old_root, new_root, flipped)
    for bit in bits(len(proof)):
        yield f"bit {bit} of the old root", (old, new, flip(old_root, bit), new_root, proof)
    for bit in bits(len(proof) + 1):
        yield f"bit {bit} of the new root", (old, new, old_root, flip(new_root, bit), proof)

    yield "old - 1", (old - 1, new, old_root, new_root, proof)
    yield "old + 1", (old + 1, new, old_root, new_root, proof)
    yield "new * 2", (old, new * 2, old_root, new_root, proof)
    yield "new // 2", (old, new // 2, old_root, new_root, proof)
    yield "hash appended", (old, new, old_root, new_root, [*proof, EXTRA_HASH])
    if proof:
        yield "last hash removed", (old, new, old_root, new_root, proof[:-1])
    if old != new:
        yield "roots swapped", (old, new, new_root, old_root, proof)
    yield "new root of new + 1", (old, new, old_root, ref_root(new + 1), proof)
    if new > THOROUGH_MAX_SIZE:
        return
    yield "old * 2", (old * 2, new, old_root, new_root, proof)
    yield "old // 2", (old // 2, new, old_root, new_root, proof)
    yield "hash prepended", (old, new, old_root, new_root, [EXTRA_HASH, *proof])
    yield "old root appended", (old, new, old_root, new_root, [*proof, old_root])
    for j in range(len(proof)):
        yield f"hash {j} removed", (old, new, old_root, new_root, proof[:j] + proof[j + 1 :])
        yield f"hash {j} duplicated", (old, new, old_root, new_root, proof[: j + 1] + proof[j:])
    if len(proof) > 1:
        yield "proof reversed", (old, new, old_root, new_root, proof[::-1])
    yield "old root of old - 1", (old, new, ref_root(old - 1), new_root, proof)
    yield "old root of old + 1", (old, new, ref_root(old + 1), new_root, proof)
    yield "new root of new - 1", (old, new, old_root, ref_root(new - 1), proof)


def _inclusion_failure(args: Inclusion) -> str | None:
    """None if check_inclusion refuses ``args`` with its own error, else why not."""
    try:
        result = check_inclusion(*args)
    except Exception as exc:  # a crash is a failure of the test, reported by case
        return f"raised {exc!r}"
    if result.ok:
        return "verified"
    if type(result.failures[0]) is not InclusionProofError or len(result.failures) != 1:
        return f"failed with {result.describe()}"
    return None


def _consistency_failure(args: Consistency) -> str | None:
    """None if check_consistency refuses ``args`` with its own error, else why not."""
    try:
        result = check_consistency(*args)
    except Exception as exc:  # a crash is a failure of the test, reported by case
        return f"raised {exc!r}"
    if result.ok:
        return "verified"
    if type(result.failures[0]) is not ConsistencyProofError or len(result.failures) != 1:
        return f"failed with {result.describe()}"
    return None


def _run_inclusion_mutations(
    max_size: int, choose_bits: Callable[[int, int, int], BitChoice]
) -> None:
    failures: list[str] = []
    checked = 0
    for size in range(1, max_size + 1):
        root, source = ref_root(size), tree(size)
        for index in range(size):
            proof = inclusion_proof(index, size, source)
            bits = choose_bits(index, size, len(proof))
            for what, args in inclusion_mutations(
                LEAF_HASHES[index], index, size, proof, root, bits=bits
            ):
                checked += 1
                reason = _inclusion_failure(args)
                if reason is not None:
                    failures.append(f"index {index}, size {size}, {what}: {reason}")
    assert not failures, _fail_report(failures, checked)


def _run_consistency_mutations(
    max_size: int, choose_bits: Callable[[int, int, int], BitChoice]
) -> None:
    failures: list[str] = []
    checked = 0
    for new in range(1, max_size + 1):
        new_root, source = ref_root(new), tree(new)
        for old in range(1, new + 1):
            proof = consistency_proof(old, new, source)
            bits = choose_bits(old, new, len(proof))
            for what, args in consistency_mutations(
                old, new, ref_root(old), new_root, proof, bits=bits
            ):
                checked += 1
                reason = _consistency_failure(args)
                if reason is not None:
                    failures.append(f"old {old}, new {new}, {what}: {reason}")
    assert not failures, _fail_report(failures, checked)


def test_every_bit_of_every_inclusion_hash_matters_up_to_16_leaves() -> None:
    _run_inclusion_mutations(ALL_BITS_MAX_SIZE, lambda _i, _size, _length: all_bits)


def test_every_bit_of_every_consistency_hash_matters_up_to_16_leaves() -> None:
    _run_consistency_mutations(ALL_BITS_MAX_SIZE, lambda _i, _size, _length: all_bits)


def test_every_inclusion_mutation_fails_up_to_256_leaves() -> None:
    positions: set[int] = set()
    # One sampled bit in each proof hash and in the leaf hash (position len(proof)).
    _run_inclusion_mutations(
        MAX_SIZE,
        lambda index, size, length: _sampled_bits(index, size, length + 1, positions),
    )
    assert positions == set(range(256)), f"bits never flipped: {set(range(256)) - positions}"


def test_every_consistency_mutation_fails_up_to_256_leaves() -> None:
    positions: set[int] = set()
    # One sampled bit in each proof hash; the roots' bits are covered up to 16 leaves.
    _run_consistency_mutations(
        MAX_SIZE, lambda old, new, length: _sampled_bits(old, new, length, positions)
    )
    assert positions == set(range(256)), f"bits never flipped: {set(range(256)) - positions}"


def test_mutations_of_the_empty_and_equal_size_cases_fail() -> None:
    failures: list[str] = []
    cases: list[tuple[str, Consistency]] = []
    for n in range(1, 9):
        cases += [
            (f"0 -> {n}, old root of size 1", (0, n, ref_root(1), ref_root(n), [])),
            (f"0 -> {n}, old root flipped", (0, n, flip(EMPTY_ROOT, n), ref_root(n), [])),
            (f"0 -> {n}, a proof hash", (0, n, EMPTY_ROOT, ref_root(n), [EXTRA_HASH])),
            (f"{n} -> {n}, new root of n+1", (n, n, ref_root(n), ref_root(n + 1), [])),
            (f"{n} -> {n}, old root of n-1", (n, n, ref_root(n - 1), ref_root(n), [])),
            (f"{n} -> {n}, a proof hash", (n, n, ref_root(n), ref_root(n), [ref_root(n)])),
        ]
    cases.append(("0 -> 0, new root of size 1", (0, 0, EMPTY_ROOT, ref_root(1), [])))
    for case, args in cases:
        reason = _consistency_failure(args)
        if reason is not None:
            failures.append(f"{case}: {reason}")
    assert not failures, _fail_report(failures, len(cases))


def test_consistency_between_empty_trees_requires_the_empty_root() -> None:
    assert check_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, []).ok
    result = check_consistency(0, 0, EMPTY_ROOT, ref_root(1), [])
    assert not result.ok
    assert result.codes == ("bad-consistency-proof",)


def test_invalid_arguments_fail_through_the_raising_wrappers() -> None:
    """Mutations that make an argument impossible still raise the proof's own error,
    never a UsageError, IndexError or ValueError from deeper down."""
    proof8 = inclusion_proof(0, 8, tree(8))
    leaf, root8 = LEAF_HASHES[0], ref_root(8)
    for index, size in [(-1, 8), (8, 8), (0, 0), (0, -1), (-1, 0), (2**63, 2**64)]:
        with pytest.raises(InclusionProofError) as caught:
            verify_inclusion(leaf, index, size, proof8, root8)
        assert type(caught.value) is InclusionProofError
        assert caught.value.code == "bad-inclusion-proof"
    cproof = consistency_proof(3, 8, tree(8))
    for old, new in [(-1, 8), (3, -1), (9, 8), (3, 2), (-3, -1), (3, 2**64)]:
        with pytest.raises(ConsistencyProofError) as caught_c:
            verify_consistency(old, new, ref_root(3), root8, cproof)
        assert type(caught_c.value) is ConsistencyProofError
        assert caught_c.value.code == "bad-consistency-proof"


def test_raising_wrappers_return_none_for_valid_proofs_and_raise_for_tampered_ones() -> None:
    proof = inclusion_proof(5, 8, tree(8))
    assert verify_inclusion(LEAF_HASHES[5], 5, 8, proof, ref_root(8)) is None
    with pytest.raises(
        InclusionProofError, match=r"^inclusion proof does not lead to the root of size 8$"
    ):
        verify_inclusion(LEAF_HASHES[5], 5, 8, [flip(proof[0], 0), *proof[1:]], ref_root(8))

    cproof = consistency_proof(3, 8, tree(8))
    assert verify_consistency(3, 8, ref_root(3), ref_root(8), cproof) is None
    assert verify_consistency(0, 5, EMPTY_ROOT, ref_root(5), []) is None
    assert verify_consistency(5, 5, ref_root(5), ref_root(5), []) is None
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, []) is None
    with pytest.raises(
        ConsistencyProofError, match=r"^consistency proof does not lead to the (old|new) root"
    ):
        verify_consistency(3, 8, ref_root(3), ref_root(8), [*cproof[:-1], flip(cproof[-1], 9)])


# --- error messages say what is wrong --------------------------------------------------

R = ref_root  # short, for the table below
L = LEAF_HASHES
SHORT = b"\x00" * 31


def _incl(index: int, size: int) -> list[bytes]:
    return inclusion_proof(index, size, tree(size))


def _cons(old: int, new: int) -> list[bytes]:
    return consistency_proof(old, new, tree(new))


MESSAGE_CASES: list[tuple[str, Callable[[], Result[None]], str]] = [
    (
        "inclusion-wrong-length-short",
        lambda: check_inclusion(L[0], 0, 8, _incl(0, 8)[:2], R(8)),
        "inclusion proof has wrong length: expected 3, got 2",
    ),
    (
        "inclusion-wrong-length-long",
        lambda: check_inclusion(L[4], 4, 5, [*_incl(4, 5), EXTRA_HASH], R(5)),
        "inclusion proof has wrong length: expected 1, got 2",
    ),
    (
        "inclusion-index-past-end",
        lambda: check_inclusion(L[0], 8, 8, _incl(0, 8), R(8)),
        "leaf index 8 outside a tree of size 8",
    ),
    (
        "inclusion-negative-index",
        lambda: check_inclusion(L[0], -1, 8, _incl(0, 8), R(8)),
        "leaf index -1 outside a tree of size 8",
    ),
    (
        "inclusion-empty-tree",
        lambda: check_inclusion(L[0], 0, 0, [], EMPTY_ROOT),
        "leaf index 0 outside a tree of size 0",
    ),
    (
        "inclusion-size-over-limit",
        lambda: check_inclusion(L[0], 0, 8, _incl(0, 8), R(8), limits=Limits(max_tree_size=7)),
        "leaf index 0 outside a tree of size 8",
    ),
    (
        "inclusion-too-many-hashes",
        lambda: check_inclusion(L[0], 0, 8, [EXTRA_HASH] * 64, R(8)),
        "inclusion proof too long: 64 hashes",
    ),
    (
        "inclusion-short-proof-hash",
        lambda: check_inclusion(L[0], 0, 8, [*_incl(0, 8)[:2], SHORT], R(8)),
        "inclusion proof holds a hash that is not 32 bytes",
    ),
    (
        "inclusion-short-leaf-hash",
        lambda: check_inclusion(SHORT, 0, 8, _incl(0, 8), R(8)),
        "inclusion proof holds a hash that is not 32 bytes",
    ),
    (
        "inclusion-wrong-root",
        lambda: check_inclusion(L[0], 0, 8, _incl(0, 8), R(7)),
        "inclusion proof does not lead to the root of size 8",
    ),
    (
        "consistency-sizes-out-of-order",
        lambda: check_consistency(5, 3, R(5), R(3), []),
        "sizes out of order: old 5, new 3",
    ),
    (
        "consistency-negative-old-size",
        lambda: check_consistency(-1, 3, R(1), R(3), []),
        "sizes out of order: old -1, new 3",
    ),
    (
        "consistency-size-over-limit",
        lambda: check_consistency(3, 8, R(3), R(8), _cons(3, 8), limits=Limits(max_tree_size=7)),
        "sizes out of order: old 3, new 8",
    ),
    (
        "consistency-too-many-hashes",
        lambda: check_consistency(3, 8, R(3), R(8), [EXTRA_HASH] * 127),
        "consistency proof too long: 127 hashes",
    ),
    (
        "consistency-short-hash",
        lambda: check_consistency(3, 8, R(3), R(8), [SHORT, *_cons(3, 8)[1:]]),
        "consistency proof holds a hash that is not 32 bytes",
    ),
    (
        "consistency-from-empty-with-proof",
        lambda: check_consistency(0, 8, EMPTY_ROOT, R(8), [R(8)]),
        "consistency proof from an empty tree must be empty",
    ),
    (
        "consistency-from-empty-wrong-old-root",
        lambda: check_consistency(0, 8, R(1), R(8), []),
        "old root of an empty tree is not the empty hash",
    ),
    (
        "consistency-empty-to-empty-wrong-new-root",
        lambda: check_consistency(0, 0, EMPTY_ROOT, R(1), []),
        "new root of an empty tree is not the empty hash",
    ),
    (
        "consistency-equal-sizes-with-proof",
        lambda: check_consistency(4, 4, R(4), R(4), [R(4)]),
        "consistency proof between equal sizes must be empty",
    ),
    (
        "consistency-equal-sizes-different-roots",
        lambda: check_consistency(4, 4, R(4), R(5), []),
        "different roots for the same size 4",
    ),
    (
        "consistency-wrong-length",
        lambda: check_consistency(6, 8, R(6), R(8), _cons(6, 8)[:2]),
        "consistency proof has wrong length: expected 3, got 2",
    ),
    (
        "consistency-wrong-old-root",
        lambda: check_consistency(6, 8, R(5), R(8), _cons(6, 8)),
        "consistency proof does not lead to the old root of size 6",
    ),
    (
        "consistency-wrong-new-root",
        lambda: check_consistency(6, 8, R(6), R(9), _cons(6, 8)),
        "consistency proof does not lead to the new root of size 8",
    ),
    (
        "consistency-power-of-two-old-wrong-new-root",
        lambda: check_consistency(4, 8, R(4), R(9), _cons(4, 8)),
        "consistency proof does not lead to the new root of size 8",
    ),
]


@pytest.mark.parametrize(
    ("check", "message"),
    [pytest.param(check, message, id=case_id) for case_id, check, message in MESSAGE_CASES],
)
def test_failure_messages_are_specific(check: Callable[[], Result[None]], message: str) -> None:
    result = check()
    assert not result.ok
    assert len(result.failures) == 1
    assert str(result.failures[0]) == message
    assert result.failures[0].code in ("bad-inclusion-proof", "bad-consistency-proof")
    with pytest.raises(type(result.failures[0]), match=f"^{re.escape(message)}$"):
        result.unwrap()


# --- proof generation refuses impossible arguments -------------------------------------


@pytest.mark.parametrize(
    ("index", "size", "message"),
    [
        pytest.param(-1, 8, "leaf index -1 outside a tree of size 8", id="negative-index"),
        pytest.param(8, 8, "leaf index 8 outside a tree of size 8", id="index-past-end"),
        pytest.param(0, 0, "leaf index 0 outside a tree of size 0", id="empty-tree"),
        pytest.param(3, -2, "leaf index 3 outside a tree of size -2", id="negative-size"),
        pytest.param(0, 9, "subtree [8, 9) outside a tree of size 8", id="size-beyond-source"),
    ],
)
def test_inclusion_proof_refuses_out_of_range_arguments(
    index: int, size: int, message: str
) -> None:
    with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
        inclusion_proof(index, size, tree(8))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        pytest.param(
            5, 3, "consistency proof needs 0 <= old <= new, got 5 and 3", id="old-after-new"
        ),
        pytest.param(
            -1, 3, "consistency proof needs 0 <= old <= new, got -1 and 3", id="negative-old"
        ),
        pytest.param(
            -3, -1, "consistency proof needs 0 <= old <= new, got -3 and -1", id="both-negative"
        ),
        pytest.param(3, 9, "subtree [8, 9) outside a tree of size 8", id="new-beyond-source"),
    ],
)
def test_consistency_proof_refuses_out_of_range_arguments(old: int, new: int, message: str) -> None:
    with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
        consistency_proof(old, new, tree(8))


@pytest.mark.parametrize(
    ("start", "end"),
    [
        pytest.param(start, end, id=f"[{start},{end})")
        for start, end in [(-1, 2), (0, 0), (3, 3), (4, 2), (0, 9), (8, 9)]
    ],
)
def test_leaf_hash_tree_refuses_ranges_outside_the_tree(start: int, end: int) -> None:
    with pytest.raises(
        UsageError, match=re.escape(f"subtree [{start}, {end}) outside a tree of size 8")
    ):
        tree(8)(start, end)


# --- TreeState: the compact range --------------------------------------------------------


def _ref_compact_range(n: int) -> list[bytes]:
    """The perfect subtrees n decomposes into, largest first, from the reference."""
    nodes, start = [], 0
    for bit in reversed(range(n.bit_length())):
        if n >> bit & 1:
            nodes.append(ref_mth(LEAF_DATA[start : start + (1 << bit)]))
            start += 1 << bit
    return nodes


def test_tree_state_root_matches_the_reference_after_every_append() -> None:
    state = TreeState()
    failures = []
    for n in range(TREE_STATE_MAX_SIZE + 1):
        if state.size != n or state.root() != ref_root(n):
            failures.append(
                f"size {n}: size {state.size}, root wrong: {state.root() != ref_root(n)}"
            )
        if state.nodes != _ref_compact_range(n):
            failures.append(f"size {n}: subtree roots differ from the reference")
        if TreeState(n, list(state.nodes)).root() != ref_root(n):
            failures.append(f"size {n}: rebuilt from (size, nodes) has another root")
        state.append(LEAF_HASHES[n])
    assert not failures, _fail_report(failures, TREE_STATE_MAX_SIZE + 1)

    extended = TreeState()
    extended.extend(LEAF_HASHES[:TREE_STATE_MAX_SIZE])
    assert extended.size == TREE_STATE_MAX_SIZE
    assert extended.root() == ref_root(TREE_STATE_MAX_SIZE)


@pytest.mark.parametrize(
    ("size", "count"),
    [
        pytest.param(size, count, id=f"size{size}-nodes{count}")
        for size, count in [
            (0, 1),
            (1, 0),
            (1, 2),
            (2, 2),
            (3, 1),
            (3, 3),
            (4, 2),
            (7, 2),
            (255, 7),
            (256, 2),
        ]
    ],
)
def test_tree_state_refuses_a_wrong_number_of_nodes(size: int, count: int) -> None:
    message = f"a tree of size {size} has {size.bit_count()} subtree roots, got {count}"
    with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
        TreeState(size, [EXTRA_HASH] * count)


def test_tree_state_refuses_negative_sizes_and_short_nodes() -> None:
    with pytest.raises(UsageError, match=r"^tree size cannot be negative: -1$"):
        TreeState(-1, [])
    with pytest.raises(UsageError, match=r"^subtree roots must be 32-byte hashes$"):
        TreeState(3, [EXTRA_HASH, SHORT])


def test_tree_state_copy_is_independent() -> None:
    original = TreeState()
    original.extend(LEAF_HASHES[:5])
    copy = original.copy()
    assert copy == original
    assert copy.nodes is not original.nodes

    copy.extend(LEAF_HASHES[5:11])
    assert (original.size, original.root()) == (5, ref_root(5))
    assert (copy.size, copy.root()) == (11, ref_root(11))

    original.append(LEAF_HASHES[5])
    assert (original.size, original.root()) == (6, ref_root(6))
    assert (copy.size, copy.root()) == (11, ref_root(11))


# --- beyond the exhaustive range -------------------------------------------------------

BIG_LEAF_DATA: tuple[bytes, ...] = tuple(f"big {i}".encode() for i in range(3000))
BIG_LEAF_HASHES: tuple[bytes, ...] = tuple(_sha256(b"\x00" + d) for d in BIG_LEAF_DATA)
BIG_TREE = LeafHashTree(BIG_LEAF_HASHES)


@given(data=st.data(), new=st.integers(min_value=1, max_value=len(BIG_LEAF_DATA)))
def test_large_trees_agree_with_the_reference(data: st.DataObject, new: int) -> None:
    index = data.draw(st.integers(min_value=0, max_value=new - 1), label="index")
    old = data.draw(st.integers(min_value=1, max_value=new), label="old")
    leaves = BIG_LEAF_DATA[:new]
    new_root, old_root = ref_mth(leaves), ref_mth(BIG_LEAF_DATA[:old])

    assert root_of(BIG_LEAF_HASHES[:new]) == new_root
    path = inclusion_proof(index, new, BIG_TREE)
    assert path == ref_path(index, leaves)
    assert check_inclusion(BIG_LEAF_HASHES[index], index, new, path, new_root).ok
    if old != new:
        assert not check_inclusion(BIG_LEAF_HASHES[index], index, new, path, old_root).ok

    proof = consistency_proof(old, new, BIG_TREE)
    assert proof == (ref_proof(old, leaves) if old < new else [])
    assert check_consistency(old, new, old_root, new_root, proof).ok


@pytest.mark.parametrize(
    ("old_root", "new_root", "old_size", "new_size"),
    [
        pytest.param(b"abc", b"abc", 3, 3, id="short_equal_roots"),
        pytest.param(EMPTY_ROOT, b"", 0, 5, id="empty_new_root"),
        pytest.param(EMPTY_ROOT + b"x", EMPTY_ROOT, 0, 0, id="long_old_root"),
    ],
)
def test_roots_must_be_32_byte_hashes(
    old_root: bytes, new_root: bytes, old_size: int, new_size: int
) -> None:
    result = check_consistency(old_size, new_size, old_root, new_root, [])
    assert result.codes == ("bad-consistency-proof",)
    assert "is not a 32-byte hash" in result.describe()
    inclusion = check_inclusion(leaf_hash(b"a"), 0, 1, [], b"short")
    assert "root is not a 32-byte hash" in inclusion.describe()


def test_append_completing_reports_every_perfect_subtree_it_completes() -> None:
    leaves = [leaf_hash(bytes([n % 256, n // 256])) for n in range(70)]
    tree = LeafHashTree(leaves)
    state = TreeState()
    for n, leaf in enumerate(leaves, start=1):
        completed = state.append_completing(leaf)
        widths = [2 ** (k + 1) for k in range(len(completed))]
        assert widths == [w for w in (2, 4, 8, 16, 32, 64) if n % w == 0]
        assert completed == [tree(n - w, n) for w in widths]
