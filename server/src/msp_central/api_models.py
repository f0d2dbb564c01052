"""Request and response bodies of the partner, admin and appliance APIs.

Requests are parsed strictly (unknown members refused); responses are built
from these models, and :mod:`msp_central.openapi` derives the OpenAPI
document's schemas from the same classes, so the document cannot drift from
what the server sends.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    WithJsonSchema,
)

from msp_central.catalogue import Tier
from msp_central.names import name_pattern, readable_name
from msp_protocol.bundle import Severity
from msp_protocol.dsse import Envelope, PayloadType
from msp_protocol.encoding import Timestamp

# The catalogue's ten frameworks (a test holds this to the catalogue the
# migrations load). The document names them, so a client knows which ids
# the server takes; the server checks them against the catalogue itself
# (and says "unknown framework ..." of any other).
FRAMEWORK_IDS = (
    "hipaa", "soc2", "pci_dss", "nist_csf", "nist_800_171",
    "sox", "gdpr", "cmmc", "iso_27001", "cis",
)  # fmt: skip
FrameworkId = Annotated[
    str,
    StringConstraints(strict=True, pattern=r"^[a-z0-9][a-z0-9_]{0,31}$"),
    WithJsonSchema({"type": "string", "enum": list(FRAMEWORK_IDS)}),
]
Industry = Literal[
    "healthcare", "finance", "technology", "defence", "government", "education", "retail", "legal"
]


def _name_schema(schema: dict[str, Any]) -> None:
    """The document states what :func:`readable_name` refuses, so a client
    (and a fuzzer) knows a valid name before sending it."""
    schema["pattern"] = name_pattern()


# A name a person gave: printable, in NFC, spacing made plain and nothing
# invisible (msp_central.names); no control characters (PostgreSQL cannot
# store NUL, and no name needs a newline).
Name = Annotated[
    str,
    StringConstraints(
        strict=True,
        strip_whitespace=True,
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00-\x1f\x7f]+$",
    ),
    AfterValidator(readable_name),
    Field(json_schema_extra=_name_schema),
]
# Canonical padded base64 of at least one byte.
BASE64_PATTERN = (
    r"^(?:[A-Za-z0-9+/]{4})*"
    r"(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$"
)
# An e-mail address as an invitation takes it: local part, a dot in the domain.
INVITE_EMAIL_PATTERN = r"^\s*[^@\s\x00-\x1f\x7f]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z0-9-]{2,63}\s*$"
Printable = Annotated[str, StringConstraints(strict=True, pattern=r"^[^\x00-\x1f\x7f]*$")]
# Each framework once (msp_central.queries.check_frameworks refuses a repeat).
FrameworkList = Annotated[
    list[FrameworkId], Field(max_length=10, json_schema_extra={"uniqueItems": True})
]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- catalogue ------------------------------------------------------------------


class ControlOut(Body):
    id: str
    title: str
    runbooks: list[str]
    # True when at least one runbook is mapped (the appliance gives evidence);
    # false when a person attaches the evidence. Derived from ``runbooks``.
    automated: bool


class FrameworkOut(Body):
    id: str
    name: str
    edition: str
    controls: list[ControlOut]


class RunbookOut(Body):
    id: str
    title: str
    tier: Tier
    check: str
    l1_action: str | None
    description: str


class PresetOut(Body):
    id: str
    name: str
    description: str
    tier: Tier
    frameworks: list[str]


# --- partners and sites ------------------------------------------------------------


class PartnerDefaults(Body):
    industry: Industry | None = None
    tier: Tier = Tier.BASIC
    frameworks: FrameworkList = []


class PartnerOut(Body):
    id: str
    name: str
    created_at: datetime
    defaults: PartnerDefaults


class PartnerPage(Body):
    items: list[PartnerOut]
    next_cursor: str | None


class PartnerCreate(Body):
    name: Name


class PartnerCreated(Body):
    partner: PartnerOut
    api_key: str  # shown once, stored only as a hash


class SiteOverrides(Body):
    """Per-site settings; null inherits the partner's default."""

    industry: Industry | None = None
    tier: Tier | None = None
    frameworks: FrameworkList | None = None


class SiteCreate(Body):
    name: Name
    overrides: SiteOverrides = SiteOverrides()


Source = Literal["partner", "site"]
Setting = Literal["industry", "tier", "frameworks"]


class EffectiveConfig(Body):
    site_id: str
    industry: Industry | None
    tier: Tier
    frameworks: list[str]
    runbooks: list[str]
    sources: dict[Setting, Source]


class SiteOut(Body):
    id: str
    partner_id: str
    name: str
    created_at: datetime
    overrides: SiteOverrides
    effective: EffectiveConfig
    # Set when the site was taken out of service: its history stays
    # readable, its settings and enrollment are closed.
    decommissioned_at: datetime | None = None


class SitePage(Body):
    items: list[SiteOut]
    next_cursor: str | None


class ApplyPreset(Body):
    preset: Industry


class FrameworkUse(Body):
    framework: str
    name: str
    site_count: int
    sites: list[str]


class SiteFrameworks(Body):
    site_id: str
    name: str
    frameworks: list[str]
    # Where each effective setting comes from, as in EffectiveConfig: a
    # change of the partner's defaults reaches the sites whose setting is
    # "partner" (what the console previews before applying a preset).
    sources: dict[Setting, Source]


class FrameworkUsage(Body):
    site_count: int
    frameworks: list[FrameworkUse]
    sites: list[SiteFrameworks]


class TokenCreate(Body):
    hours: Annotated[StrictInt, Field(ge=1, le=24 * 30)] | None = None


class TokenOut(Body):
    id: str  # names the token in listings and revocation
    token: str  # shown once, stored only as a hash
    site_id: str
    expires_at: datetime


# --- lifecycle: renaming, decommissioning, tokens and keys ----------------------------


class SettingsWarning(Body):
    """A setting that is allowed but probably not meant (a site covering no
    framework); the change was applied all the same."""

    code: Literal["no-frameworks", "industry-mismatch"]
    detail: str


class PartnerDefaultsPatch(Body):
    """The members a merge patch of the defaults may carry; null clears one
    (industry none, tier basic, no frameworks). Documents the request: the
    handler applies the patch and checks the result as PartnerDefaults."""

    industry: Industry | None = None
    tier: Tier | None = None
    frameworks: FrameworkList | None = None


class PartnerSettingsOut(PartnerOut):
    warnings: list[SettingsWarning]


class SiteSettingsOut(SiteOut):
    warnings: list[SettingsWarning]


class SiteRename(Body):
    name: Name


class ApplianceDecommission(Body):
    reason: Annotated[Printable, StringConstraints(max_length=256)] = ""


class ApplianceDecommissioned(Body):
    id: str
    site_id: str
    decommissioned_at: datetime
    # Every certificate serial of the appliance, all revoked now.
    revoked_serials: list[str]


TokenState = Literal["active", "used", "expired", "revoked"]


class EnrollmentTokenOut(Body):
    """An enrollment token as listings show it: never its secret."""

    id: str
    site_id: str
    created_at: datetime
    created_by: str | None
    expires_at: datetime
    used_at: datetime | None
    appliance_id: str | None
    revoked_at: datetime | None
    state: TokenState


class EnrollmentTokenPage(Body):
    items: list[EnrollmentTokenOut]
    next_cursor: str | None


# expiring: rotated, still accepted until revoked_at.
ApiKeyState = Literal["active", "expiring", "revoked"]


class ApiKeyOut(Body):
    id: str
    name: str
    prefix: str  # the secret's first characters: names it, never enough to use it
    role: Literal["partner", "admin"]
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None
    state: ApiKeyState


class ApiKeyPage(Body):
    items: list[ApiKeyOut]
    next_cursor: str | None


class ApiKeyCreate(Body):
    name: Name


class ApiKeyCreated(Body):
    key: ApiKeyOut
    api_key: str  # shown once, stored only as a hash


class ApiKeyRotate(Body):
    # How long the old key keeps working beside the new one (at most a week).
    overlap_minutes: Annotated[StrictInt, Field(ge=0, le=7 * 24 * 60)] = 0


class ApiKeyRotated(Body):
    key: ApiKeyOut
    api_key: str  # the new key, shown once
    previous: ApiKeyOut  # the old key, revoked at the end of the overlap


# --- appliances as partners see them -----------------------------------------------

ApplianceStatus = Literal["online", "offline", "never-seen", "revoked", "decommissioned"]


class ApplianceOut(Body):
    id: str
    site_id: str
    created_at: datetime
    status: ApplianceStatus
    last_seen_at: datetime | None
    last_sync_at: datetime | None
    # The appliance's log as the server witnessed it (what the heartbeat
    # answers as witnessed_size), and as the appliance last reported it.
    witnessed_size: int
    witnessed_root: str
    log_size: int | None
    flagged_checkpoints: int
    certificate_serial: str | None
    certificate_not_after: datetime | None
    heartbeat: dict[str, object] | None
    # The checks whose newest bundle from this appliance failed or erred,
    # sorted: what needs looking at, without reading the evidence list.
    failing_checks: list[str]


class AppliancePage(Body):
    items: list[ApplianceOut]
    next_cursor: str | None


class ApplianceSummary(Body):
    """Counts over every appliance a list with the same filters holds, each
    status as the list gives it."""

    total: int
    online: int
    offline: int
    never_seen: int
    revoked: int
    decommissioned: int
    # Neither revoked nor decommissioned, its certificate ending within
    # expiring_within_days or ended.
    certificate_expiring: int
    # With at least one check whose newest bundle failed or erred.
    with_failing_checks: int
    expiring_within_days: int
    counted_at: datetime


class RevokeIn(Body):
    reason: Annotated[Printable, StringConstraints(max_length=256)] = ""


class RevokeOut(Body):
    serial: str
    appliance_id: str
    cutoff_size: int
    # Every serial of the same key, revoked with it (a renewal keeps the key).
    revoked_serials: list[str]
    revocation_list_version: int


class EscalationOut(Body):
    id: str  # the appliance's own id: unique with appliance_id
    appliance_id: str
    site_id: str
    severity: Severity
    title: str
    detail: dict[str, object]
    created_at: datetime
    received_at: datetime
    log_index: int | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None  # an actor, as the central log names it
    acknowledged_note: str | None


class EscalationPage(Body):
    items: list[EscalationOut]
    next_cursor: str | None


class AcknowledgeIn(Body):
    note: Annotated[Printable, StringConstraints(max_length=2000)] = ""


class AlertOut(Body):
    id: int
    appliance_id: str | None
    site_id: str | None
    code: str
    detail: str
    created_at: datetime


class AlertPage(Body):
    items: list[AlertOut]
    next_cursor: str | None


class EvidenceOut(Body):
    id: str  # the appliance's own id: unique with appliance_id
    appliance_id: str
    site_id: str
    check_id: str
    result: str
    controls: dict[str, list[str]]
    collected_at: datetime
    log_index: int
    signed_after_expiry: bool
    # Whether the witnessed audit entry at log_index records this bundle
    # (null: that entry has not been synced yet).
    in_log: bool | None
    received_at: datetime


class EvidencePage(Body):
    items: list[EvidenceOut]
    next_cursor: str | None


# --- compliance posture -----------------------------------------------------------------

PostureState = Literal["passing", "failing", "error", "stale", "manual", "not_applicable"]


class PostureEvidenceOut(Body):
    """The signed bundle a control's state rests on."""

    bundle_id: str
    appliance_id: str
    check_id: str
    result: str
    collected_at: datetime
    log_index: int
    signed_after_expiry: bool
    in_log: bool | None
    # What the check observed to fail (``observed.reason``), when it said.
    reason: str | None


class StateCounts(Body):
    passing: int
    failing: int
    error: int
    stale: int
    manual: int
    not_applicable: int


class AttachmentRefOut(Body):
    """Manual evidence in force for a control."""

    id: str
    filename: str
    sha256: str
    attached_by: str
    attached_at: datetime
    expires_at: datetime | None
    log_index: int  # its entry in the central log


class ControlPostureOut(Body):
    control_id: str
    title: str
    # True: a check of the site's tier gives evidence for it; false: manual.
    automated: bool
    state: PostureState
    evidence: PostureEvidenceOut | None
    # How many (appliance, check) pairs gave evidence for it.
    checks: int
    # The newest document attached to it and in force: it makes a manual
    # control passing; beside an automated one it is shown, not counted.
    manual_evidence: AttachmentRefOut | None


class FrameworkScoreOut(Body):
    framework_id: str
    name: str
    # Passing among the controls evidence decides, in percent (null: none).
    score: int | None
    counts: StateCounts


class FrameworkPostureOut(FrameworkScoreOut):
    controls: list[ControlPostureOut]


class SitePostureOut(Body):
    site_id: str
    name: str
    evaluated_at: datetime
    frameworks: list[FrameworkPostureOut]


class SiteScoresOut(Body):
    site_id: str
    name: str
    frameworks: list[FrameworkScoreOut]


class FrameworkRollupOut(FrameworkScoreOut):
    site_count: int


class SiteStateOut(Body):
    site_id: str
    name: str
    evidence: PostureEvidenceOut | None


class FailingControlOut(Body):
    framework_id: str
    control_id: str
    title: str
    site_count: int
    sites: list[SiteStateOut]


class PartnerPostureOut(Body):
    evaluated_at: datetime
    sites: list[SiteScoresOut]
    # Per framework across the sites that use it: counts summed, score over the sum.
    frameworks: list[FrameworkRollupOut]
    # Failing controls across all sites, the most widely failing first.
    failing_controls: list[FailingControlOut]


class TrendPointOut(Body):
    date: str  # the UTC day, YYYY-MM-DD
    at: datetime  # the instant evaluated: the day's end, or now for today
    frameworks: list[FrameworkScoreOut]


class PostureTrendOut(Body):
    site_id: str
    days: list[TrendPointOut]


# --- audit log generations --------------------------------------------------------------


class NewAuditLogIn(Body):
    """Approve a new audit log for an appliance whose log the server refused."""

    # Why: kept with the generation and in the central log.
    reason: Annotated[
        Printable, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)
    ]


class AuditLogGenerationOut(Body):
    generation: int
    current: bool  # the one being witnessed now
    # As witnessed: up to now for the current one, when it was closed for
    # the others.
    size: int
    root: str
    # Who approved it and why (none for an appliance's first log).
    approved_at: datetime | None
    approved_by: str | None
    reason: str | None
    central_log_index: int | None  # the approval's entry in the central log


class AuditLogGenerationsOut(Body):
    appliance_id: str
    current_generation: int
    generations: list[AuditLogGenerationOut]  # oldest first


# --- manual evidence --------------------------------------------------------------------

MediaType = Annotated[
    str,
    StringConstraints(
        strict=True,
        max_length=100,
        pattern=r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,49}/[a-z0-9][a-z0-9!#$&^_.+-]{0,49}$",
    ),
]


class ManualEvidenceIn(Body):
    """A document attached to a control of a site: a policy, a training record."""

    framework_id: FrameworkId
    control_id: Annotated[Printable, StringConstraints(min_length=1, max_length=64)]
    filename: Name
    media_type: MediaType
    # The document, base64 (standard alphabet, padded, canonical: the unused
    # bits of the last character zero, as msp_protocol.encoding.b64decode takes).
    content: Annotated[
        str,
        StringConstraints(strict=True, min_length=1),
        Field(json_schema_extra={"pattern": BASE64_PATTERN}),
    ]
    note: Annotated[Printable, StringConstraints(max_length=2000)] = ""
    # When it stops counting (a yearly training record); none: until replaced.
    expires_at: Timestamp | None = None


class ManualEvidenceOut(Body):
    id: str
    site_id: str
    framework_id: str
    control_id: str
    filename: str
    media_type: str
    size: int
    sha256: str
    note: str
    attached_by: str
    attached_at: datetime
    expires_at: datetime | None
    in_force: bool
    log_index: int  # its entry in the central log: the hash is there for good


class ManualEvidencePage(Body):
    items: list[ManualEvidenceOut]
    next_cursor: str | None


# --- notifications ------------------------------------------------------------------

NotificationKind = Literal[
    "appliance.offline", "appliance.online", "escalation.urgent", "security.alert"
]
DeliveryState = Literal["pending", "delivered", "failed"]


class ChannelCreate(Body):
    """A webhook (``url``) or an e-mail address (``email``) to tell of
    ``events`` (default: every kind)."""

    # Each kind takes its own address and not the other's (the handler
    # refuses anything else): the document says so.
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "properties": {"kind": {"const": "webhook"}, "email": {"type": "null"}},
                    "required": ["url"],
                    "not": {"properties": {"url": {"type": "null"}}, "required": ["url"]},
                },
                {
                    "properties": {"kind": {"const": "email"}, "url": {"type": "null"}},
                    "required": ["email"],
                    "not": {"properties": {"email": {"type": "null"}}, "required": ["email"]},
                },
            ]
        }
    )

    kind: Literal["webhook", "email"]
    url: Annotated[Printable, StringConstraints(min_length=1, max_length=2048)] | None = None
    email: (
        Annotated[
            str,
            StringConstraints(
                strict=True, max_length=254, pattern=r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+$"
            ),
        ]
        | None
    ) = None
    events: Annotated[list[NotificationKind], Field(min_length=1, max_length=4)] = [
        "appliance.offline",
        "appliance.online",
        "escalation.urgent",
        "security.alert",
    ]


class ChannelOut(Body):
    id: str
    kind: Literal["webhook", "email"]
    url: str | None
    email: str | None
    events: list[str]
    enabled: bool
    disabled_reason: str | None
    created_at: datetime


class ChannelCreated(Body):
    channel: ChannelOut
    # The webhook signing secret (whsec_…), shown this once; null for e-mail.
    secret: str | None


class ChannelTestOut(Body):
    event_id: str
    delivery_id: str


class DeliveryOut(Body):
    id: str
    event_id: str
    channel_id: str
    kind: str
    site_id: str | None
    appliance_id: str | None
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class ChannelPage(Body):
    items: list[ChannelOut]
    next_cursor: str | None


class DeliveryPage(Body):
    items: list[DeliveryOut]
    next_cursor: str | None


# --- the appliance API ------------------------------------------------------------------


class EnrollIn(Body):
    token: Annotated[str, StringConstraints(strict=True, min_length=16, max_length=128)]
    # A delegation request, signed by the key to certify.
    request: Annotated[
        Envelope,
        WithJsonSchema(
            {
                "allOf": [{"$ref": "#/components/schemas/Envelope"}],
                "properties": {
                    "payloadType": {"const": str(PayloadType.DELEGATION_REQUEST)},
                    # A key id is 16 lowercase hex digits.
                    "signatures": {
                        "items": {"properties": {"keyid": {"pattern": "^[0-9a-f]{16}$"}}}
                    },
                },
            }
        ),
    ]


class EnrollOut(Body):
    appliance_id: str
    site_id: str
    certificate: Envelope


class CertificateIn(Body):
    request: Envelope


class CertificateOut(Body):
    certificate: Envelope


class LaneHealthOut(Body):
    in_flight: Annotated[StrictInt, Field(ge=0)]  # requests of the lane being handled now
    limit: Annotated[StrictInt, Field(ge=1)]
    shed: Annotated[StrictInt, Field(ge=0)]  # answered 503 since the process started


class HealthOut(Body):
    # A replica that cannot serve (no database, shutting down) answers 503
    # with a problem document. "busy": a lane is full or shed a request in
    # the last seconds; the replica still serves and sheds what it cannot.
    status: Literal["ok", "busy"]
    database: Literal["ok"]
    lanes: dict[Literal["bulk", "urgent", "interactive"], LaneHealthOut]


class HeartbeatIn(Body):
    version: Annotated[Printable, StringConstraints(max_length=64)]
    log_size: Annotated[StrictInt, Field(ge=0)]
    queues: Annotated[
        dict[Annotated[str, StringConstraints(max_length=32)], Annotated[StrictInt, Field(ge=0)]],
        Field(max_length=16),
    ]
    clock: Timestamp
    # How often the appliance runs its checks: posture calls its evidence
    # stale after a few missed rounds. Absent from older agents.
    check_interval_seconds: Annotated[StrictInt, Field(ge=1, le=7 * 24 * 3600)] | None = None
    # How often it beats: it is called offline after a few missed beats.
    heartbeat_interval_seconds: Annotated[StrictInt, Field(ge=1, le=7 * 24 * 3600)] | None = None
    # What an operator's dashboard shows of the appliance, as it sees
    # itself (absent from older agents): the size of its log it holds a
    # receipt for, its last successful sync, when its certificate ends,
    # and how many problems it reports.
    witnessed_size: Annotated[StrictInt, Field(ge=0)] | None = None
    last_sync_at: Timestamp | None = None
    certificate_not_after: Timestamp | None = None
    problems: Annotated[StrictInt, Field(ge=0, le=10_000)] | None = None


class HeartbeatOut(Body):
    server_time: Timestamp
    clock_skew_seconds: float
    witnessed_size: int


class EvidenceAccepted(Body):
    bundle_id: str
    stored: bool  # false: this bundle was already held (a resend)
    signed_after_expiry: bool
    # True: the bundle's audit entry is witnessed and records this bundle;
    # null: that entry has not been synced yet.
    in_log: bool | None


class EscalationAccepted(Body):
    escalation_id: str
    stored: bool


class Problem(Body):
    model_config = ConfigDict(extra="allow", frozen=True)

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None


# --- console users ------------------------------------------------------------------------

Role = Literal["viewer", "editor", "admin"]


class Me(Body):
    """Who is asking: a console user, or an API key (which acts as an admin
    of its partner)."""

    kind: Literal["user", "key"]
    partner_id: str
    partner_name: str
    role: Role
    user_id: str | None
    email: str | None
    totp_enabled: bool | None


class UserOut(Body):
    id: str
    email: str
    role: Role
    totp_enabled: bool
    created_at: datetime
    created_by: str


class UserPage(Body):
    items: list[UserOut]
    next_cursor: str | None


class UserUpdate(Body):
    role: Role


class InviteCreate(Body):
    # The form msp_central.console.accounts.normalise_email takes (any case,
    # spaces around it trimmed).
    email: Annotated[
        str,
        StringConstraints(strict=True, min_length=3, max_length=254),
        Field(json_schema_extra={"pattern": INVITE_EMAIL_PATTERN}),
    ]
    role: Role


class InviteOut(Body):
    id: str
    email: str
    role: Role
    created_at: datetime
    created_by: str
    expires_at: datetime
    state: Literal["pending", "used", "expired", "revoked"]


class InvitePage(Body):
    items: list[InviteOut]
    next_cursor: str | None


class InviteCreated(Body):
    invite: InviteOut
    # The one-time link: shown once, and e-mailed when the server has SMTP.
    link: str
    emailed: bool


class SessionsEnded(Body):
    ended: int
