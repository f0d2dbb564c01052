"""DSSE envelopes: PAE, signing, verification, payload-type separation."""

from __future__ import annotations

import base64
import hashlib
import pickle

import pytest

from msp_protocol import errors
from msp_protocol.dsse import (
    Envelope,
    EnvelopeSignature,
    PayloadType,
    check_envelope,
    pae,
    parse_envelope,
    sign_document,
    sign_envelope,
    verify_envelope,
)
from msp_protocol.keys import SigningKey, key_id
from msp_protocol.limits import Limits
from tests.protocol.support import key


def test_pae_matches_the_dsse_specification() -> None:
    # DSSE protocol.md: PAE("http://example.com/HelloWorld", "hello world").
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert pae("", b"") == b"DSSEv1 0  0 "


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t\u00e9", b"\xc3\xa9") == "DSSEv1 3 t\u00e9 2 \u00e9".encode()


def test_key_id_is_sha256_prefix_of_raw_public_key() -> None:
    signer = key(3)
    assert signer.key_id == hashlib.sha256(signer.verify_key.raw).hexdigest()[:16]
    assert key_id(signer.verify_key.raw) == signer.key_id


def test_round_trip_through_json() -> None:
    signer = key(3)
    envelope = sign_document(PayloadType.EVIDENCE, {"b": 1, "a": [True, None]}, [signer])
    again = parse_envelope(envelope.to_json())
    verified = verify_envelope(
        again, payload_type=PayloadType.EVIDENCE, trusted=[signer.verify_key]
    )
    assert verified.payload == b'{"a":[true,null],"b":1}'
    assert verified.value == {"a": [True, None], "b": 1}
    assert verified.signers == (signer.key_id,)


def test_refuses_a_payload_type_it_did_not_ask_for() -> None:
    signer = key(3)
    envelope = sign_document(PayloadType.EVIDENCE, {"a": 1}, [signer])
    result = check_envelope(
        envelope, payload_type=PayloadType.CHECKPOINT, trusted=[signer.verify_key]
    )
    assert result.codes == ("wrong-payload-type",)
    assert "expected application/vnd.msp.checkpoint.v1+json" in str(result.failures[0])


def test_payload_type_is_inside_the_signature() -> None:
    """Relabelling an evidence envelope as a checkpoint breaks its signature."""
    signer = key(3)
    envelope = sign_document(PayloadType.EVIDENCE, {"a": 1}, [signer])
    relabelled = envelope.model_copy(update={"payloadType": PayloadType.CHECKPOINT.value})
    result = check_envelope(
        relabelled, payload_type=PayloadType.CHECKPOINT, trusted=[signer.verify_key]
    )
    assert result.codes == ("bad-signature",)


def test_untrusted_signer_is_refused() -> None:
    envelope = sign_document(PayloadType.EVIDENCE, {"a": 1}, [key(3)])
    result = check_envelope(
        envelope, payload_type=PayloadType.EVIDENCE, trusted=[key(4).verify_key]
    )
    assert result.codes == ("bad-signature",)
    assert "is not trusted" in str(result.failures[0])


def test_duplicate_signatures_count_once_towards_the_threshold() -> None:
    signer = key(3)
    envelope = sign_document(PayloadType.EVIDENCE, {"a": 1}, [signer, signer])
    result = check_envelope(
        envelope,
        payload_type=PayloadType.EVIDENCE,
        trusted=[signer.verify_key, key(4).verify_key],
        threshold=2,
    )
    assert result.codes == ("bad-signature",)
    assert "1 of 2 required" in str(result.failures[0])


def test_threshold_two_of_two() -> None:
    a, b = key(3), key(4)
    envelope = sign_document(PayloadType.EVIDENCE, {"a": 1}, [a, b])
    verified = verify_envelope(
        envelope,
        payload_type=PayloadType.EVIDENCE,
        trusted=[a.verify_key, b.verify_key],
        threshold=2,
    )
    assert set(verified.signers) == {a.key_id, b.key_id}


@pytest.mark.parametrize("threshold", [0, -1])
def test_threshold_below_one_is_a_usage_error(threshold: int) -> None:
    envelope = sign_document(PayloadType.EVIDENCE, {"a": 1}, [key(3)])
    with pytest.raises(errors.UsageError, match="at least 1"):
        check_envelope(
            envelope,
            payload_type=PayloadType.EVIDENCE,
            trusted=[key(3).verify_key],
            threshold=threshold,
        )


def test_too_many_signatures_are_refused_before_verifying() -> None:
    signers = [key(n) for n in range(10, 15)]
    envelope = sign_document(PayloadType.EVIDENCE, {"a": 1}, signers)
    result = check_envelope(
        envelope,
        payload_type=PayloadType.EVIDENCE,
        trusted=[s.verify_key for s in signers],
        limits=Limits(max_envelope_signatures=4),
    )
    assert "too many signatures: 5, limit 4" in result.describe()


def test_oversize_payload_is_refused() -> None:
    signer = key(3)
    envelope = sign_envelope(PayloadType.EVIDENCE, b'{"a":"' + b"x" * 100 + b'"}', [signer])
    result = check_envelope(
        envelope,
        payload_type=PayloadType.EVIDENCE,
        trusted=[signer.verify_key],
        max_payload_bytes=50,
    )
    assert "payload too large: 108 bytes, limit 50" in result.describe()


def test_signed_non_json_payload_is_malformed_not_trusted() -> None:
    signer = key(3)
    envelope = sign_envelope(PayloadType.EVIDENCE, b'{"a":1,"a":2}', [signer])
    result = check_envelope(
        envelope, payload_type=PayloadType.EVIDENCE, trusted=[signer.verify_key]
    )
    assert result.codes == ("malformed-json",)


def test_urlsafe_base64_is_accepted_as_dsse_requires() -> None:
    signer = key(3)
    payload = b'{"k":"\xff\xfe?>"}'.replace(b"\xff\xfe", "\u00ff\u00fe".encode())
    envelope = sign_envelope(PayloadType.EVIDENCE, payload, [signer])
    urlsafe = Envelope(
        payloadType=envelope.payloadType,
        payload=base64.urlsafe_b64encode(payload).decode().rstrip("="),
        signatures=tuple(
            EnvelopeSignature(
                keyid=s.keyid,
                sig=base64.urlsafe_b64encode(base64.b64decode(s.sig)).decode(),
            )
            for s in envelope.signatures
        ),
    )
    verified = verify_envelope(
        urlsafe, payload_type=PayloadType.EVIDENCE, trusted=[signer.verify_key]
    )
    assert verified.payload == payload


@pytest.mark.parametrize(
    ("document", "message"),
    [
        pytest.param(
            {"payloadType": "t", "payload": "", "signatures": []}, "signatures", id="no_signatures"
        ),
        pytest.param(
            {"payloadType": "t", "payload": "", "signatures": [{"keyid": "00", "sig": ""}]},
            "keyid",
            id="short_keyid",
        ),
        pytest.param(
            {
                "payloadType": "t",
                "payload": "",
                "signatures": [{"keyid": "0" * 16, "sig": ""}],
                "extra": 1,
            },
            "extra: Extra inputs are not permitted",
            id="unknown_field",
        ),
        pytest.param([], "is not a JSON object", id="not_an_object"),
    ],
)
def test_malformed_envelopes(document: object, message: str) -> None:
    with pytest.raises(errors.ModelError, match=message):
        parse_envelope(document)  # type: ignore[arg-type]


def test_bad_base64_payload_is_an_encoding_failure() -> None:
    signer = key(3)
    envelope = sign_document(PayloadType.EVIDENCE, {"a": 1}, [signer])
    broken = envelope.model_copy(update={"payload": "%%%"})
    result = check_envelope(broken, payload_type=PayloadType.EVIDENCE, trusted=[signer.verify_key])
    assert result.codes == ("malformed-encoding",)


def test_signing_key_never_shows_its_seed() -> None:
    signer = SigningKey(bytes(range(32)))
    seed_hex = bytes(range(32)).hex()
    for text in (repr(signer), str(signer), f"{signer}"):
        assert seed_hex not in text
        assert signer.key_id in text
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(signer)
