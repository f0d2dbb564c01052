"""The OpenAPI 3.1 document, served at ``/api/v1/openapi.json``.

Schemas come from the pydantic models the handlers use to parse requests
and build responses (:mod:`msp_central.api_models` and the protocol's wire
models), so the document describes exactly what is sent. The tests validate
every response they receive against it.
"""

from __future__ import annotations

from functools import cache
from typing import Any, get_args

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from msp_central import __version__
from msp_central import api_models as m
from msp_protocol.bundle import Escalation, Severity
from msp_protocol.central_log import CentralLogExport, CentralRecordProof
from msp_protocol.dsse import Envelope
from msp_protocol.evidence import CheckResult
from msp_protocol.export import AuditExport, EvidenceExport
from msp_protocol.package import AuditorPackage
from msp_protocol.sync import SyncRequest, SyncResponse

Security = list[dict[str, list[str]]]
# A partner's console user (session cookie; state-changing calls also send
# the session's CSRF token) may call what a partner key may, within the
# user's role.
PARTNER: Security = [{"partnerKey": []}, {"consoleSession": []}]
ADMIN: Security = [{"adminKey": []}]
ANY_KEY: Security = [{"partnerKey": []}, {"adminKey": []}, {"consoleSession": []}]
APPLIANCE: Security = [{"httpSignature": []}]
NONE: Security = []

# A document whose schema is not ours: OSCAL's own models describe it (the
# tests validate the documents against them).
OSCAL_DOCUMENT: dict[str, Any] = {
    "type": "object",
    "description": "An OSCAL Assessment Results document",
    "required": ["assessment-results"],
    "properties": {"assessment-results": {"type": "object"}},
}

# (method, path, summary, security, request model, {status: response model,
# a JSON schema of a document not ours, or None})
OPERATIONS: list[
    tuple[str, str, str, list[dict[str, list[str]]], type[BaseModel] | None, dict[int, Any]]
] = [
    ("get", "/api/v1/frameworks", "The ten frameworks, their controls, mapped runbooks and whether each is automated", ANY_KEY, None, {200: list[m.FrameworkOut]}),
    ("get", "/api/v1/frameworks/{framework_id}", "One framework", ANY_KEY, None, {200: m.FrameworkOut}),
    ("get", "/api/v1/runbooks", "Every runbook and its coverage tier", ANY_KEY, None, {200: list[m.RunbookOut]}),
    ("get", "/api/v1/presets", "Industry presets", ANY_KEY, None, {200: list[m.PresetOut]}),
    ("post", "/api/v1/partners", "Create a partner and its first API key", ADMIN, m.PartnerCreate, {201: m.PartnerCreated}),
    ("get", "/api/v1/partners", "List partners, a page at a time", ADMIN, None, {200: m.PartnerPage}),
    ("get", "/api/v1/partner", "The calling partner and its defaults", PARTNER, None, {200: m.PartnerOut}),
    ("put", "/api/v1/partner/defaults", "Set the partner's defaults", PARTNER, m.PartnerDefaults, {200: m.PartnerOut}),
    ("post", "/api/v1/partner/apply-preset", "Set the partner's defaults from a preset", PARTNER, m.ApplyPreset, {200: m.PartnerOut}),
    ("get", "/api/v1/sites", "The partner's sites, a page at a time", PARTNER, None, {200: m.SitePage}),
    ("post", "/api/v1/sites", "Create a site", PARTNER, m.SiteCreate, {201: m.SiteOut}),
    ("get", "/api/v1/sites/{site_id}", "One site", PARTNER, None, {200: m.SiteOut}),
    ("put", "/api/v1/sites/{site_id}/overrides", "Set a site's overrides", PARTNER, m.SiteOverrides, {200: m.SiteOut}),
    ("post", "/api/v1/sites/{site_id}/apply-preset", "Override a site with a preset", PARTNER, m.ApplyPreset, {200: m.SiteOut}),
    ("get", "/api/v1/sites/{site_id}/effective-config", "A site's effective configuration", PARTNER, None, {200: m.EffectiveConfig}),
    ("get", "/api/v1/framework-usage", "Framework usage across the partner's sites in service", PARTNER, None, {200: m.FrameworkUsage}),
    ("post", "/api/v1/sites/{site_id}/enrollment-tokens", "A one-time enrollment token", PARTNER, m.TokenCreate, {201: m.TokenOut}),
    ("get", "/api/v1/sites/{site_id}/enrollment-tokens", "A site's enrollment tokens and their state (never their secrets)", PARTNER, None, {200: m.EnrollmentTokenPage}),
    ("delete", "/api/v1/sites/{site_id}/enrollment-tokens/{token_id}", "Revoke an enrollment token not used yet", PARTNER, None, {200: m.EnrollmentTokenOut}),
    ("patch", "/api/v1/partner/defaults", "Change some of the partner's defaults (JSON Merge Patch: null clears)", PARTNER, m.PartnerDefaultsPatch, {200: m.PartnerSettingsOut}),
    ("patch", "/api/v1/sites/{site_id}/overrides", "Change some of a site's overrides (JSON Merge Patch: null inherits again)", PARTNER, m.SiteOverrides, {200: m.SiteSettingsOut}),
    ("patch", "/api/v1/sites/{site_id}", "Rename a site", PARTNER, m.SiteRename, {200: m.SiteOut}),
    ("delete", "/api/v1/sites/{site_id}", "Decommission a site: certificates and unused tokens revoked, history kept", PARTNER, None, {200: m.SiteOut}),
    ("post", "/api/v1/sites/{site_id}/appliances/{appliance_id}/decommission", "Decommission an appliance: its certificates revoked, its history kept", PARTNER, m.ApplianceDecommission, {200: m.ApplianceDecommissioned}),
    ("get", "/api/v1/api-keys", "The partner's API keys (never their secrets)", PARTNER, None, {200: m.ApiKeyPage}),
    ("post", "/api/v1/api-keys", "Another API key for the partner (shown once)", PARTNER, m.ApiKeyCreate, {201: m.ApiKeyCreated}),
    ("post", "/api/v1/api-keys/{key_id}/rotate", "A new key replacing this one, which keeps working for the overlap", PARTNER, m.ApiKeyRotate, {201: m.ApiKeyRotated}),
    ("delete", "/api/v1/api-keys/{key_id}", "Revoke an API key now (never the partner's last active key)", PARTNER, None, {200: m.ApiKeyOut}),
    ("get", "/api/v1/me", "Who is asking: a console user or an API key, its partner and role", PARTNER, None, {200: m.Me}),
    ("delete", "/api/v1/me/sessions", "Sign the asking console user out everywhere", PARTNER, None, {200: m.SessionsEnded}),
    ("get", "/api/v1/users", "The partner's console users and their roles", PARTNER, None, {200: m.UserPage}),
    ("patch", "/api/v1/users/{user_id}", "Give a user another role (admins only; the last admin stays one)", PARTNER, m.UserUpdate, {200: m.UserOut}),
    ("delete", "/api/v1/users/{user_id}", "Remove a user and end their sessions (admins only)", PARTNER, None, {204: None}),
    ("get", "/api/v1/user-invites", "The partner's invitations and their state (admins only)", PARTNER, None, {200: m.InvitePage}),
    ("post", "/api/v1/user-invites", "Invite someone with a role: a one-time link, e-mailed when SMTP is set up", PARTNER, m.InviteCreate, {201: m.InviteCreated}),
    ("delete", "/api/v1/user-invites/{invite_id}", "Withdraw an unused invitation (admins only)", PARTNER, None, {200: m.InviteOut}),
    ("get", "/api/v1/sites/{site_id}/appliances", "A site's appliances and their state, a page at a time", PARTNER, None, {200: m.AppliancePage}),
    ("get", "/api/v1/appliances", "The appliances of all the partner's sites and their state, a page at a time", PARTNER, None, {200: m.AppliancePage}),
    ("get", "/api/v1/appliances/summary", "Counts over every appliance the list would give with the same filters: per status, certificates expiring, failing checks", PARTNER, None, {200: m.ApplianceSummary}),
    ("get", "/api/v1/sites/{site_id}/evidence", "A site's evidence bundles, newest first, a page at a time", PARTNER, None, {200: m.EvidencePage}),
    ("get", "/api/v1/sites/{site_id}/posture", "A site's compliance posture, control by control, with the evidence behind each state", PARTNER, None, {200: m.SitePostureOut}),
    ("get", "/api/v1/sites/{site_id}/posture/oscal", "A site's posture as an OSCAL 1.2.1 Assessment Results document: a finding per control, an observation per signed bundle linking its evidence export", PARTNER, None, {200: OSCAL_DOCUMENT}),
    ("get", "/api/v1/sites/{site_id}/posture/trend", "A site's posture at the end of each day", PARTNER, None, {200: m.PostureTrendOut}),
    ("get", "/api/v1/posture", "Posture across the partner's sites: scores, per-framework roll-ups, the most widely failing controls", PARTNER, None, {200: m.PartnerPostureOut}),
    ("get", "/api/v1/sites/{site_id}/evidence/{appliance_id}/{bundle_id}", "One evidence bundle as an evidence export: its signed envelope, certificate, audit entry, inclusion proof and receipt (msp-verify checks it)", PARTNER, None, {200: EvidenceExport}),
    ("get", "/api/v1/sites/{site_id}/appliances/{appliance_id}/audit-export", "An appliance's audit log as the server witnessed it (msp-verify checks it)", PARTNER, None, {200: AuditExport}),
    ("get", "/api/v1/sites/{site_id}/appliances/{appliance_id}/audit-log/generations", "The generations of an appliance's witnessed audit log: one more each time a partner approved a new log", PARTNER, None, {200: m.AuditLogGenerationsOut}),
    ("post", "/api/v1/sites/{site_id}/appliances/{appliance_id}/audit-log/approve-new", "Approve the new audit log of an appliance whose log the server refused: the current generation is closed and kept, the next one starts empty", PARTNER, m.NewAuditLogIn, {201: m.AuditLogGenerationsOut}),
    ("get", "/api/v1/sites/{site_id}/auditor-package", "An auditor package: a site's signed evidence for frameworks and a period, with its proofs and a summary (msp-verify checks it)", PARTNER, None, {200: AuditorPackage}),
    ("post", "/api/v1/sites/{site_id}/manual-evidence", "Attach a document to a control of the site (its hash goes into the central log)", PARTNER, m.ManualEvidenceIn, {201: m.ManualEvidenceOut}),
    ("get", "/api/v1/sites/{site_id}/manual-evidence", "The documents attached to the site's controls, newest first, a page at a time", PARTNER, None, {200: m.ManualEvidencePage}),
    ("get", "/api/v1/sites/{site_id}/manual-evidence/{attachment_id}", "One attached document's record", PARTNER, None, {200: m.ManualEvidenceOut}),
    ("get", "/api/v1/sites/{site_id}/manual-evidence/{attachment_id}/document", "The attached document, exactly as attached", PARTNER, None, {200: bytes}),
    ("get", "/api/v1/sites/{site_id}/manual-evidence/{attachment_id}/proof", "The document's central log entry, inclusion proof and root-signed checkpoint", PARTNER, None, {200: CentralRecordProof}),
    ("get", "/api/v1/central-log/export", "The central server's own audit log, for msp-verify (administrators)", ADMIN, None, {200: CentralLogExport}),
    ("get", "/.well-known/msp-central-key", "The central public key, hex, as msp-verify --central-key-file reads it", NONE, None, {200: str}),
    ("post", "/api/v1/certificates/{serial}/revoke", "Revoke an appliance certificate", PARTNER, m.RevokeIn, {200: m.RevokeOut}),
    ("get", "/api/v1/escalations", "The partner's escalations, newest first, a page at a time", PARTNER, None, {200: m.EscalationPage}),
    ("post", "/api/v1/escalations/{appliance_id}/{escalation_id}/acknowledge", "Acknowledge an escalation, with an optional note (the body may be empty); the first acknowledgement stands", PARTNER, m.AcknowledgeIn, {200: m.EscalationOut}),
    ("get", "/api/v1/security-alerts", "Security alerts raised by ingest, newest first, a page at a time", PARTNER, None, {200: m.AlertPage}),
    ("get", "/api/v1/notification-channels", "The partner's notification channels, a page at a time", PARTNER, None, {200: m.ChannelPage}),
    ("post", "/api/v1/notification-channels", "Add a webhook or e-mail channel (a webhook's signing secret is returned this once)", PARTNER, m.ChannelCreate, {201: m.ChannelCreated}),
    ("get", "/api/v1/notification-channels/{channel_id}", "One notification channel", PARTNER, None, {200: m.ChannelOut}),
    ("delete", "/api/v1/notification-channels/{channel_id}", "Delete a notification channel (its deliveries stay listed)", PARTNER, None, {204: None}),
    ("post", "/api/v1/notification-channels/{channel_id}/test", "Send a test event to the channel", PARTNER, None, {202: m.ChannelTestOut}),
    ("get", "/api/v1/notification-deliveries", "Notification deliveries, newest first, with their attempts and last result", PARTNER, None, {200: m.DeliveryPage}),
    ("post", "/api/v1/enroll", "Enroll an appliance (token + proof of possession)", NONE, m.EnrollIn, {200: m.EnrollOut, 201: m.EnrollOut}),
    ("post", "/api/v1/appliances/{appliance_id}/certificates", "Renew or rotate the appliance's certificate (200: a retried renewal, answered again)", APPLIANCE, m.CertificateIn, {200: m.CertificateOut, 201: m.CertificateOut}),
    ("get", "/api/v1/revocations", "The signed revocation list", APPLIANCE, None, {200: Envelope, 304: None}),
    ("post", "/api/v1/appliances/{appliance_id}/heartbeat", "Report the appliance's state", APPLIANCE, m.HeartbeatIn, {200: m.HeartbeatOut}),
    ("get", "/api/v1/appliances/{appliance_id}/bundles/{kind}", "A signed config bundle (ETag)", APPLIANCE, None, {200: Envelope, 304: None}),
    ("post", "/api/v1/appliances/{appliance_id}/audit/sync", "Witnessed audit sync", APPLIANCE, SyncRequest, {200: SyncResponse}),
    ("post", "/api/v1/appliances/{appliance_id}/evidence", "Submit a signed evidence bundle", APPLIANCE, Envelope, {200: m.EvidenceAccepted, 201: m.EvidenceAccepted}),
    ("post", "/api/v1/appliances/{appliance_id}/escalations", "Raise an urgent escalation", APPLIANCE, Escalation, {200: m.EscalationAccepted, 201: m.EscalationAccepted}),
    ("get", "/api/v1/openapi.json", "This document", NONE, None, {200: None}),
    ("get", "/api/v1/health", "Whether this server can serve (for a load balancer's health check)", NONE, None, {200: m.HealthOut}),
]  # fmt: skip

# Operations whose credential travels in the body, not in a security scheme:
# they too answer 429 once it failed too often.
CREDENTIAL_IN_BODY = {("post", "/api/v1/enroll")}

# Settings changed by RFC 7396 JSON Merge Patch (plain JSON accepted too).
MERGE_PATCHES = {
    ("patch", "/api/v1/partner/defaults"),
    ("patch", "/api/v1/sites/{site_id}/overrides"),
}

REF = "#/components/schemas/{model}"
# Responses that are not JSON: the central key as text, documents as whatever
# type they were attached as.
_MEDIA: dict[Any, str] = {str: "text/plain", bytes: "*/*"}


def _media(model: Any) -> str:
    return _MEDIA.get(model, "application/json") if isinstance(model, type) else "application/json"


DEFAULT_LIMIT = 100
MAX_LIMIT = 500

# The query parameters of every paginated list (msp_central.pagination).
PAGE_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": f"items per page (default {DEFAULT_LIMIT}, at most {MAX_LIMIT})",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
    },
    {
        "name": "cursor",
        "in": "query",
        "required": False,
        "description": "next_cursor of the previous page, to read the next one",
        "schema": {"type": "string", "maxLength": 512, "pattern": "^[A-Za-z0-9_-]+$"},
    },
]


_FRAMEWORK_FILTER: dict[str, Any] = {
    "name": "framework",
    "in": "query",
    "required": False,
    "description": "only this framework (one the site uses)",
    "schema": {"type": "string", "pattern": "^[^\\x00-\\x1f\\x7f]*$"},
}


# What msp_central.params refuses in any free-text query value.
NO_CONTROLS = r"^[^\x00-\x1f\x7f]*$"


def _filter(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_IDENTIFIER: dict[str, Any] = {"type": "string", "maxLength": 64, "pattern": NO_CONTROLS}
_MOMENT: dict[str, Any] = {"type": "string", "format": "date-time"}


def _period(column: str) -> list[dict[str, Any]]:
    return [
        _filter("from", f"only those whose {column} is at or after this, RFC 3339", _MOMENT),
        _filter("to", f"only those whose {column} is before this (exclusive), RFC 3339", _MOMENT),
    ]


def _decommissioned(what: str) -> dict[str, Any]:
    return _filter(
        "decommissioned",
        f"false (the default): only {what} in service; true: only decommissioned ones",
        {"type": "boolean", "default": False},
    )


_SITE_FILTER = _filter("site_id", "only this site's", _IDENTIFIER)
_APPLIANCE_FILTER = _filter("appliance_id", "only this appliance's", _IDENTIFIER)
_APPLIANCE_FILTERS = [_decommissioned("appliances")]

QUERY_PARAMETERS: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("get", "/api/v1/partners"): PAGE_PARAMETERS,
    ("get", "/api/v1/sites"): [
        *PAGE_PARAMETERS,
        _filter(
            "framework",
            "only sites running this framework (their own list, or the partner's defaults)",
            {"type": "string", "maxLength": 32, "pattern": NO_CONTROLS},
        ),
        _decommissioned("sites"),
        _filter(
            "name",
            "only sites whose name contains this, any case",
            {"type": "string", "maxLength": 200, "pattern": NO_CONTROLS},
        ),
    ],
    ("get", "/api/v1/sites/{site_id}/appliances"): [*PAGE_PARAMETERS, *_APPLIANCE_FILTERS],
    ("get", "/api/v1/appliances"): [*PAGE_PARAMETERS, _SITE_FILTER, *_APPLIANCE_FILTERS],
    ("get", "/api/v1/appliances/summary"): [_SITE_FILTER, *_APPLIANCE_FILTERS],
    ("get", "/api/v1/sites/{site_id}/evidence"): [
        *PAGE_PARAMETERS,
        _APPLIANCE_FILTER,
        _filter(
            "check_id",
            "only bundles of this check",
            {"type": "string", "maxLength": 64, "pattern": NO_CONTROLS},
        ),
        _filter(
            "result",
            "only bundles with this result",
            {"type": "string", "enum": list(get_args(CheckResult))},
        ),
        _filter(
            "framework",
            "only bundles giving evidence for a control of this framework",
            {"type": "string", "maxLength": 32, "pattern": NO_CONTROLS},
        ),
        *_period("collected_at"),
        _filter(
            "in_log",
            "true: only bundles the witnessed log records; false: only those it does not (bundles whose entry is not synced yet are in neither)",
            {"type": "boolean"},
        ),
    ],
    ("get", "/api/v1/sites/{site_id}/manual-evidence"): PAGE_PARAMETERS,
    ("get", "/api/v1/escalations"): [
        *PAGE_PARAMETERS,
        _SITE_FILTER,
        _APPLIANCE_FILTER,
        _filter(
            "severity",
            "only escalations of this severity",
            {"type": "string", "enum": list(get_args(Severity))},
        ),
        _filter(
            "open",
            "true: only escalations not acknowledged yet; false: only acknowledged ones",
            {"type": "boolean"},
        ),
        *_period("received_at"),
    ],
    ("get", "/api/v1/security-alerts"): [
        *PAGE_PARAMETERS,
        _SITE_FILTER,
        _APPLIANCE_FILTER,
        _filter(
            "code",
            "only alerts of this code",
            {"type": "string", "maxLength": 64, "pattern": NO_CONTROLS},
        ),
        *_period("created_at"),
    ],
    ("get", "/api/v1/sites/{site_id}/enrollment-tokens"): PAGE_PARAMETERS,
    ("get", "/api/v1/api-keys"): PAGE_PARAMETERS,
    ("get", "/api/v1/users"): PAGE_PARAMETERS,
    ("get", "/api/v1/user-invites"): PAGE_PARAMETERS,
    ("get", "/api/v1/sites/{site_id}/posture"): [_FRAMEWORK_FILTER],
    ("get", "/api/v1/sites/{site_id}/posture/oscal"): [_FRAMEWORK_FILTER],
    ("get", "/api/v1/sites/{site_id}/auditor-package"): [
        {
            "name": "framework",
            "in": "query",
            "required": False,
            "description": "frameworks to include (repeat the parameter; default: all the site uses)",
            "schema": {"type": "array", "items": {"type": "string", "pattern": NO_CONTROLS}},
            "style": "form",
            "explode": True,
        },
        {
            "name": "from",
            "in": "query",
            "required": False,
            "description": "the period's start, RFC 3339 (default: 90 days before its end)",
            "schema": {"type": "string", "format": "date-time"},
        },
        {
            "name": "to",
            "in": "query",
            "required": False,
            "description": "the period's end, exclusive, RFC 3339 (default: now)",
            "schema": {"type": "string", "format": "date-time"},
        },
    ],
    ("get", "/api/v1/sites/{site_id}/appliances/{appliance_id}/audit-export"): [
        {
            "name": "generation",
            "in": "query",
            "required": False,
            "description": "which generation of the log (default: the current one)",
            "schema": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
        }
    ],
    ("get", "/api/v1/notification-channels"): PAGE_PARAMETERS,
    ("get", "/api/v1/notification-deliveries"): [
        *PAGE_PARAMETERS,
        {
            "name": "channel_id",
            "in": "query",
            "required": False,
            "description": "only deliveries to this channel",
            "schema": {"type": "string", "maxLength": 64, "pattern": NO_CONTROLS},
        },
        {
            "name": "state",
            "in": "query",
            "required": False,
            "description": "only deliveries in this state",
            "schema": {"type": "string", "enum": ["pending", "delivered", "failed"]},
        },
        {
            "name": "kind",
            "in": "query",
            "required": False,
            "description": "only deliveries of events of this kind",
            "schema": {
                "type": "string",
                "enum": [
                    "appliance.offline",
                    "appliance.online",
                    "escalation.urgent",
                    "security.alert",
                    "channel.test",
                ],
            },
        },
    ],
    ("get", "/api/v1/sites/{site_id}/posture/trend"): [
        _FRAMEWORK_FILTER,
        {
            "name": "days",
            "in": "query",
            "required": False,
            "description": "how many days back, today included (default and most: 90)",
            "schema": {"type": "integer", "minimum": 1, "maximum": 90},
        },
    ],
}


def query_parameters(method: str, path: str) -> list[dict[str, Any]] | None:
    """The query parameters an operation declares; None for an operation
    the document does not describe."""
    if (method, path) not in _OPERATION_KEYS:
        return None
    return QUERY_PARAMETERS.get((method, path), [])


_OPERATION_KEYS = {(method, path) for method, path, *_ in OPERATIONS}


def _schema_of(annotation: Any) -> dict[str, Any]:
    if annotation is str:
        return {"type": "string"}
    if annotation is bytes:
        return {"type": "string", "format": "binary"}
    if isinstance(annotation, dict):
        return annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {"$ref": REF.format(model=annotation.__name__)}
    (item,) = annotation.__args__  # list[Model]
    return {"type": "array", "items": _schema_of(item)}


def _models() -> list[type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {"Problem": m.Problem}
    for _method, _path, _summary, _security, request, responses in OPERATIONS:
        for annotation in [request, *responses.values()]:
            if isinstance(annotation, dict):
                continue
            model = annotation
            while model is not None and not isinstance(model, type):
                (model,) = model.__args__
            if model is not None and model not in (str, bytes):
                found[model.__name__] = model
    return list(found.values())


@cache
def document() -> dict[str, Any]:
    models = _models()
    _, top = models_json_schema(
        [(model, "validation" if model is not m.Problem else "serialization") for model in models],
        ref_template=REF,
    )
    schemas: dict[str, Any] = top.get("$defs", {})
    paths: dict[str, Any] = {}
    problem = {
        "description": "An RFC 9457 problem",
        "content": {"application/problem+json": {"schema": {"$ref": REF.format(model="Problem")}}},
    }
    too_many = {
        "description": (
            "Too many failed credentials from the caller's address: this one, or, past "
            "a higher bound, any that fails (after very many, any at all); a problem "
            "too-many-attempts with Retry-After"
        ),
        "headers": {
            "Retry-After": {
                "description": "Seconds until the caller's count ends",
                "required": True,
                "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
            }
        },
        "content": problem["content"],
    }
    for method, path, summary, security, request, responses in OPERATIONS:
        operation: dict[str, Any] = {
            "summary": summary,
            "operationId": f"{method}_{path.removeprefix('/api/v1/').replace('/', '_').replace('{', '').replace('}', '').replace('-', '_').replace('.', '_')}",
            "security": security,
            "responses": {
                str(status): (
                    {"description": "Not modified" if status == 304 else "No content"}
                    if model is None and status in (204, 304)
                    else {
                        "description": "Success",
                        "content": {_media(model): {"schema": _schema_of(model) if model else {}}},
                    }
                )
                for status, model in responses.items()
            }
            | ({"429": too_many} if security or (method, path) in CREDENTIAL_IN_BODY else {})
            | {"default": problem},
        }
        parameters = [
            {"name": part[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for part in path.split("/")
            if part.startswith("{")
        ]
        parameters += QUERY_PARAMETERS.get((method, path), [])
        if parameters:
            operation["parameters"] = parameters
        if request is not None:
            media: tuple[str, ...] = ("application/json",)
            if (method, path) in MERGE_PATCHES:
                media = ("application/merge-patch+json", "application/json")
            operation["requestBody"] = {
                "required": True,
                "content": {kind: {"schema": _schema_of(request)} for kind in media},
            }
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MSP Central Command",
            "version": __version__,
            "description": (
                "Partners (Bearer API keys) manage sites and compliance settings; appliances "
                "(RFC 9421 signatures: ed25519, covering @method, @target-uri and "
                "content-digest, with created, nonce and keyid) report their witnessed audit "
                "log, evidence and escalations. Errors are RFC 9457 problems whose type is "
                "urn:msp:problem:<code>. Any operation but the health check may answer 503 "
                "server-busy (the server sheds load) or database-unavailable, with "
                "Retry-After in seconds: send the same request again after that long."
            ),
        },
        "servers": [{"url": "/"}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "partnerKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A partner API key",
                },
                "adminKey": {"type": "http", "scheme": "bearer", "description": "An admin API key"},
                "consoleSession": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "__Host-msp-session",
                    "description": (
                        "A partner user's console session (msp-session over plain HTTP on "
                        "loopback). State-changing calls must also send the session's CSRF "
                        "token in X-CSRF-Token; the user's role (viewer, editor, admin) "
                        "limits what they may change."
                    ),
                },
                "httpSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Signature",
                    "description": "RFC 9421 HTTP Message Signature (label msp) by the appliance's delegated key",
                },
            },
        },
        "paths": paths,
    }
