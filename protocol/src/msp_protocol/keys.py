"""Ed25519 keys and key ids.

A key id is the first 16 hex characters of SHA-256 over the raw 32-byte public
key. :class:`SigningKey` never shows its secret: not in ``repr``, not in
``str``, not when pickled. Writing a seed to disk is the agent's and the
central server's business (``seed_bytes`` is the one way out, and its name says
what it hands over).
"""

from __future__ import annotations

import hashlib
from typing import NoReturn

import nacl.exceptions
import nacl.signing

from msp_protocol.encoding import KeyId, from_hex, to_hex
from msp_protocol.errors import EncodingError, SignatureError

KEY_BYTES = 32
SIGNATURE_BYTES = 64


def key_id(public_key: bytes) -> KeyId:
    if len(public_key) != KEY_BYTES:
        raise EncodingError(
            f"public key has wrong length: expected 32 bytes, got {len(public_key)}"
        )
    return KeyId(hashlib.sha256(public_key).hexdigest()[:16])


class VerifyKey:
    """An Ed25519 public key with its key id."""

    __slots__ = ("_key", "key_id", "raw")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_BYTES:
            raise EncodingError(f"public key has wrong length: expected 32 bytes, got {len(raw)}")
        self.raw = bytes(raw)
        self.key_id = key_id(self.raw)
        self._key = nacl.signing.VerifyKey(self.raw)

    @classmethod
    def from_hex(cls, text: str) -> VerifyKey:
        return cls(from_hex(text, length=KEY_BYTES, what="public key"))

    @property
    def hex(self) -> str:
        return to_hex(self.raw)

    def verify(self, message: bytes, signature: bytes) -> None:
        """Raise :class:`SignatureError` unless ``signature`` is ours over ``message``."""
        if len(signature) != SIGNATURE_BYTES:
            raise SignatureError(
                f"signature has wrong length: expected 64 bytes, got {len(signature)}"
            )
        try:
            self._key.verify(message, signature)
        except nacl.exceptions.BadSignatureError:
            raise SignatureError(f"signature does not verify under key {self.key_id}") from None

    def is_valid(self, message: bytes, signature: bytes) -> bool:
        try:
            self.verify(message, signature)
        except SignatureError:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey(key_id={self.key_id!r})"


class SigningKey:
    """An Ed25519 private key. Its seed is never part of any text it produces."""

    __slots__ = ("_key", "verify_key")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != KEY_BYTES:
            # Never echo the seed, not even its length-mismatched bytes.
            raise EncodingError("private key seed has wrong length: expected 32 bytes")
        self._key = nacl.signing.SigningKey(bytes(seed))
        self.verify_key = VerifyKey(bytes(self._key.verify_key))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def key_id(self) -> KeyId:
        return self.verify_key.key_id

    def sign(self, message: bytes) -> bytes:
        """The raw 64-byte signature. Callers sign ``pae(...)`` bytes, never a bare
        payload: see :mod:`msp_protocol.dsse`."""
        return self._key.sign(message).signature

    def seed_bytes(self) -> bytes:
        """The 32-byte secret seed, for writing the key file and nothing else."""
        return bytes(self._key)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SigningKey cannot be pickled or copied out of its process")
