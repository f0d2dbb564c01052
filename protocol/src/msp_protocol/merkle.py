"""The RFC 6962 Merkle tree: hashes, roots, inclusion and consistency proofs.

Definitions (RFC 6962 §2.1)::

    MTH({})        = SHA-256()
    MTH({d0})      = SHA-256(0x00 || d0)
    MTH(D[n])      = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))
                     where k is the largest power of two smaller than n

Proofs are generated as RFC 6962 §2.1.1 (PATH) and §2.1.2 (PROOF / SUBPROOF)
define them, over a *subtree source*: a function giving ``MTH(D[start:end])``.
:class:`LeafHashTree` is the in-memory source; the agent's store supplies one
backed by the hashes it keeps on disk. Proofs are verified with the
algorithms of RFC 9162 §2.1.3.2 and §2.1.4.2, which compute the same trees
and are written for verifiers.

:class:`TreeState` is the "compact range" of a tree: the roots of the perfect
subtrees its size decomposes into, at most one per bit of the size. Appending
a leaf touches O(log n) of them and never re-reads an old leaf.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from msp_protocol.errors import (
    ConsistencyProofError,
    InclusionProofError,
    ModelError,
    UsageError,
)
from msp_protocol.limits import DEFAULT_LIMITS, Limits
from msp_protocol.result import Result, raising

HASH_BYTES = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

SubtreeSource = Callable[[int, int], bytes]
"""``source(start, end)`` returns MTH(D[start:end]) for 0 <= start < end <= size."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over already-hashed leaves, level by level.

    Pairing neighbours and carrying an odd last node up unchanged builds
    exactly the RFC 6962 tree (its left subtrees are the perfect ones).
    """
    if not leaf_hashes:
        return EMPTY_ROOT
    level = list(leaf_hashes)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


class LeafHashTree:
    """A subtree source over leaf hashes held in memory.

    Perfect, aligned subtrees (every left sibling a proof needs) are cached, so
    a series of proofs over one tree costs O(n) once, then O(log² n) each.
    """

    def __init__(self, leaf_hashes: Sequence[bytes]) -> None:
        self._leaves = leaf_hashes
        self._perfect: dict[tuple[int, int], bytes] = {}

    @property
    def size(self) -> int:
        return len(self._leaves)

    def __call__(self, start: int, end: int) -> bytes:
        if not 0 <= start < end <= len(self._leaves):
            raise UsageError(f"subtree [{start}, {end}) outside a tree of size {len(self._leaves)}")
        width = end - start
        if width == 1:
            return self._leaves[start]
        if width & (width - 1) == 0 and start % width == 0:
            cached = self._perfect.get((start, end))
            if cached is None:
                half = width // 2
                cached = node_hash(self(start, start + half), self(start + half, end))
                self._perfect[(start, end)] = cached
            return cached
        k = _split(width)
        return node_hash(self(start, start + k), self(start + k, end))

    def root(self) -> bytes:
        return self(0, len(self._leaves)) if self._leaves else EMPTY_ROOT


def inclusion_proof(index: int, size: int, source: SubtreeSource) -> list[bytes]:
    """PATH(index, D[size]) of RFC 6962 §2.1.1, leaf-side first."""
    if not 0 <= index < size:
        raise UsageError(f"leaf index {index} outside a tree of size {size}")
    siblings: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        mid = start + _split(end - start)
        if index < mid:
            siblings.append(source(mid, end))
            end = mid
        else:
            siblings.append(source(start, mid))
            start = mid
    siblings.reverse()
    return siblings


def consistency_proof(old_size: int, new_size: int, source: SubtreeSource) -> list[bytes]:
    """PROOF(old_size, D[new_size]) of RFC 6962 §2.1.2 (empty when either
    size is 0 or the sizes are equal)."""
    if not 0 <= old_size <= new_size:
        raise UsageError(f"consistency proof needs 0 <= old <= new, got {old_size} and {new_size}")
    if old_size in (0, new_size):
        return []
    nodes: list[bytes] = []
    start, end, m = 0, new_size, old_size
    whole_old_tree = True  # the "b" flag of SUBPROOF
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            nodes.append(source(start + k, end))
            end = start + k
        else:
            nodes.append(source(start, start + k))
            start += k
            m -= k
            whole_old_tree = False
    if not whole_old_tree:
        nodes.append(source(start, end))
    nodes.reverse()
    return nodes


def check_inclusion(
    leaf: bytes,
    index: int,
    size: int,
    proof: Sequence[bytes],
    root: bytes,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[None]:
    """Does ``proof`` show the leaf hash ``leaf`` at ``index`` in the tree of
    ``size`` leaves with ``root``? (RFC 9162 §2.1.3.2, steps tagged.)"""
    if not 0 <= index < size <= limits.max_tree_size:  # (1)
        return _bad_inclusion(f"leaf index {index} outside a tree of size {size}")
    if len(proof) > limits.max_inclusion_proof_hashes:
        return _bad_inclusion(f"inclusion proof too long: {len(proof)} hashes")
    expected = _inclusion_length(index, size)
    if len(proof) != expected:
        return _bad_inclusion(
            f"inclusion proof has wrong length: expected {expected}, got {len(proof)}"
        )
    if any(len(node) != HASH_BYTES for node in proof) or len(leaf) != HASH_BYTES:
        return _bad_inclusion("inclusion proof holds a hash that is not 32 bytes")
    if len(root) != HASH_BYTES:
        return _bad_inclusion("root is not a 32-byte hash")
    fn, sn = index, size - 1  # (2)
    r = leaf  # (3)
    for p in proof:  # (4)
        if sn == 0:  # (4a)
            return _bad_inclusion("inclusion proof is longer than the path")
        if fn & 1 or fn == sn:  # (4b)
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1  # (4c)
        sn >>= 1
    if sn != 0:  # (5)
        return _bad_inclusion("inclusion proof is shorter than the path")
    if r != root:
        return _bad_inclusion(f"inclusion proof does not lead to the root of size {size}")
    return Result.success(None)


verify_inclusion = raising(check_inclusion)


def check_consistency(
    old_size: int,
    new_size: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[None]:
    """Does ``proof`` show the tree (new_size, new_root) is an append-only
    extension of (old_size, old_root)? (RFC 9162 §2.1.4.2, steps tagged.)"""
    if not 0 <= old_size <= new_size <= limits.max_tree_size:
        return _bad_consistency(f"sizes out of order: old {old_size}, new {new_size}")
    if len(proof) > limits.max_consistency_proof_hashes:
        return _bad_consistency(f"consistency proof too long: {len(proof)} hashes")
    if any(len(node) != HASH_BYTES for node in proof):
        return _bad_consistency("consistency proof holds a hash that is not 32 bytes")
    if len(old_root) != HASH_BYTES or len(new_root) != HASH_BYTES:
        return _bad_consistency("a root is not a 32-byte hash")
    if old_size == 0:
        # Every tree extends the empty one; the old root must still be the
        # empty tree's, or the caller holds something that is not a tree.
        if proof:
            return _bad_consistency("consistency proof from an empty tree must be empty")
        if old_root != EMPTY_ROOT:
            return _bad_consistency("old root of an empty tree is not the empty hash")
        if new_size == 0 and new_root != EMPTY_ROOT:
            return _bad_consistency("new root of an empty tree is not the empty hash")
        return Result.success(None)
    if old_size == new_size:
        if proof:
            return _bad_consistency("consistency proof between equal sizes must be empty")
        if old_root != new_root:
            return _bad_consistency(f"different roots for the same size {old_size}")
        return Result.success(None)
    expected = _consistency_length(old_size, new_size)
    if len(proof) != expected:
        return _bad_consistency(
            f"consistency proof has wrong length: expected {expected}, got {len(proof)}"
        )
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # (2) a power of two: the old root is a node of the new tree
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1  # (3)
    while fn & 1:  # (4)
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]  # (5)
    for c in path[1:]:  # (6)
        if sn == 0:  # (6a)
            return _bad_consistency("consistency proof is longer than the path")
        if fn & 1 or fn == sn:  # (6b)
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1  # (6c)
        sn >>= 1
    if sn != 0:  # (7)
        return _bad_consistency("consistency proof is shorter than the path")
    if fr != old_root:
        return _bad_consistency(
            f"consistency proof does not lead to the old root of size {old_size}"
        )
    if sr != new_root:
        return _bad_consistency(
            f"consistency proof does not lead to the new root of size {new_size}"
        )
    return Result.success(None)


verify_consistency = raising(check_consistency)


def _inclusion_length(index: int, size: int) -> int:
    """Number of hashes in PATH(index, D[size]), computed without hashing."""
    length = 0
    start, end = 0, size
    while end - start > 1:
        mid = start + _split(end - start)
        if index < mid:
            end = mid
        else:
            start = mid
        length += 1
    return length


def _consistency_length(old_size: int, new_size: int) -> int:
    length = 0
    start, end, m = 0, new_size, old_size
    whole_old_tree = True
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            end = start + k
        else:
            start += k
            m -= k
            whole_old_tree = False
        length += 1
    return length + (0 if whole_old_tree else 1)


def _bad_inclusion(message: str) -> Result[None]:
    return Result.failure(InclusionProofError(message))


def _bad_consistency(message: str) -> Result[None]:
    return Result.failure(ConsistencyProofError(message))


@dataclass(slots=True)
class TreeState:
    """The compact range of a tree: its size and the roots of the perfect
    subtrees that size decomposes into, largest (leftmost) first."""

    size: int = 0
    nodes: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 0:
            raise UsageError(f"tree size cannot be negative: {self.size}")
        if len(self.nodes) != self.size.bit_count():
            raise UsageError(
                f"a tree of size {self.size} has {self.size.bit_count()} subtree roots, "
                f"got {len(self.nodes)}"
            )
        if any(len(node) != HASH_BYTES for node in self.nodes):
            raise UsageError("subtree roots must be 32-byte hashes")

    @classmethod
    def from_compact_range(
        cls, size: int, nodes: Sequence[bytes], *, limits: Limits = DEFAULT_LIMITS
    ) -> TreeState:
        """A tree of ``size`` leaves from its compact range, as received.

        Nothing here shows the nodes are those of any real tree: whoever
        appends to the state compares the resulting root with a signed one.
        Raises :class:`ModelError` for a size or a node count no compact
        range has.
        """
        if not 0 <= size <= limits.max_tree_size:
            raise ModelError(f"compact range: tree size {size} out of range")
        if len(nodes) != size.bit_count():
            raise ModelError(
                f"compact range of a tree of size {size} has {size.bit_count()} "
                f"subtree roots, got {len(nodes)}"
            )
        if any(len(node) != HASH_BYTES for node in nodes):
            raise ModelError("compact range: subtree roots must be 32-byte hashes")
        return cls(size, list(nodes))

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash; O(log n) hashing, no old leaf read."""
        nodes = self.nodes
        nodes.append(leaf)
        self.size += 1
        # Each trailing zero bit of the new size is one pair of equal-sized
        # perfect subtrees to merge.
        size = self.size
        while not size & 1:
            right = nodes.pop()
            nodes[-1] = node_hash(nodes[-1], right)
            size >>= 1

    def append_completing(self, leaf: bytes) -> list[bytes]:
        """:meth:`append`, returning the roots of the perfect subtrees this leaf
        completes: element k is the subtree of width 2**(k+1) ending at the new
        size. A store keeps some of them to build proofs in O(log n)."""
        self.nodes.append(leaf)
        self.size += 1
        # Each trailing zero bit of the new size is one pair of equal-sized
        # perfect subtrees to merge.
        completed = []
        for _ in range((self.size & -self.size).bit_length() - 1):
            right = self.nodes.pop()
            left = self.nodes.pop()
            node = node_hash(left, right)
            self.nodes.append(node)
            completed.append(node)
        return completed

    def extend(self, leaves: Sequence[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        if not self.nodes:
            return EMPTY_ROOT
        result = self.nodes[-1]
        for node in reversed(self.nodes[:-1]):
            result = node_hash(node, result)
        return result

    def copy(self) -> TreeState:
        return TreeState(self.size, list(self.nodes))
