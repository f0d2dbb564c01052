"""Signed configuration bundles and urgent escalations.

The central server signs, with its root key, the bundles an appliance runs on:
its runbooks, the framework → control mappings, and the effective
configuration of its site. The appliance verifies a bundle against the pinned
root key every time it loads one, refuses a version lower than the one it
already holds (rollback), and keeps using an expired bundle while offline,
marked stale.

An escalation is an urgent incident the appliance cannot resolve itself; it is
sent (RFC 9421-signed, not DSSE) and is idempotent by ``escalation_id``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import Field, StrictInt, StringConstraints, model_validator

from msp_protocol.dsse import Envelope, PayloadType, check_envelope, sign_document
from msp_protocol.encoding import Identifier, Timestamp
from msp_protocol.errors import MalformedError, RollbackError, SubjectError, VerificationError
from msp_protocol.keys import SigningKey, VerifyKey
from msp_protocol.limits import DEFAULT_LIMITS, Limits
from msp_protocol.model import WireModel
from msp_protocol.result import Failure, Result, raising


class BundleKind(StrEnum):
    RUNBOOKS = "runbooks"
    FRAMEWORKS = "frameworks"
    SITE_CONFIG = "site-config"


class ConfigBundle(WireModel):
    document_name = "config bundle"

    kind: BundleKind
    site_id: Identifier
    version: Annotated[StrictInt, Field(ge=1, le=2**53 - 1)]
    issued_at: Timestamp
    expires_at: Timestamp
    content: dict[str, Any]

    @model_validator(mode="after")
    def _window(self) -> Self:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be later than issued_at")
        return self


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    bundle: ConfigBundle
    envelope: Envelope
    payload: bytes
    stale: bool  # past expires_at: still used, reported as stale


def sign_bundle(root: SigningKey, bundle: ConfigBundle) -> Envelope:
    return sign_document(PayloadType.BUNDLE, bundle, [root])


def check_bundle(
    envelope: Envelope,
    *,
    roots: Iterable[VerifyKey],
    kind: BundleKind,
    site_id: str,
    at: datetime,
    min_version: int = 1,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[VerifiedBundle]:
    """Verify a config bundle before using it.

    (1) signed by a pinned central root key as a bundle — forged configuration;
    (2) well-formed;
    (3) of the kind asked for — a framework mapping loaded as runbooks;
    (4) for this site — another site's configuration replayed here;
    (5) not older than the version already held — rollback to a weaker
        configuration.
    Past ``expires_at`` the bundle is still valid but ``stale``.
    """
    signed = check_envelope(envelope, payload_type=PayloadType.BUNDLE, trusted=roots, limits=limits)
    if not signed.ok:  # (1)
        return Result(None, signed.failures)
    payload = signed.unwrap()
    try:
        bundle = ConfigBundle.from_wire(payload.value)  # (2)
    except MalformedError as exc:
        return Result.failure(exc)
    failures: list[Failure] = []
    if bundle.kind != kind:  # (3)
        failures.append(VerificationError(f"bundle is {bundle.kind.value}, expected {kind.value}"))
    if bundle.site_id != site_id:  # (4)
        failures.append(SubjectError(f"bundle is for site {bundle.site_id}, not {site_id}"))
    if bundle.version < min_version:  # (5)
        failures.append(
            RollbackError(f"bundle version {bundle.version} is older than {min_version}")
        )
    return Result.collect(
        VerifiedBundle(bundle, envelope, payload.payload, stale=at > bundle.expires_at), failures
    )


verify_bundle = raising(check_bundle)


Severity = Literal["critical", "high", "medium", "low"]


class Escalation(WireModel):
    """An incident sent to the central server (``POST .../escalations``)."""

    document_name = "escalation"

    escalation_id: Identifier
    appliance_id: Identifier
    site_id: Identifier
    severity: Severity
    # One line of text: no control characters.
    title: Annotated[
        str,
        StringConstraints(
            strict=True, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$"
        ),
    ]
    detail: dict[str, Any]
    created_at: Timestamp  # the appliance's clock
    log_index: Annotated[StrictInt, Field(ge=0)] | None = None
