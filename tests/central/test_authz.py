"""Who may call what: every endpoint of the OpenAPI document against every kind
of caller, on SQLite and on PostgreSQL.

The matrix is :data:`ROWS`: one row per operation, one column per kind of
caller (:data:`CALLERS`). One test per kind of caller builds one world (two
partners, their sites and appliances, escalations, evidence, security alerts,
a revoked appliance) and walks every row; each cell that answers otherwise is
collected, and the test fails listing them all. A walk of refused calls must
also leave the owning partner's view of the world exactly as it was.

Enrollment is public (its token is the credential) and is tested on its own.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import sqlalchemy as sa

from msp_central.config import Settings
from msp_central.console.accounts import create_user
from msp_central.db.tables import api_keys
from msp_central.openapi import ADMIN, ANY_KEY, APPLIANCE, NONE, OPERATIONS, PARTNER
from msp_protocol.bundle import Escalation
from msp_protocol.central_log import check_central_log_export, check_central_record
from msp_protocol.delegation import (
    DelegationCertificate,
    RevocationList,
    Scope,
    make_delegation_request,
)
from msp_protocol.dsse import Envelope
from msp_protocol.encoding import format_time, utc_now
from msp_protocol.evidence import EvidenceBundle, sign_evidence
from msp_protocol.keys import SigningKey
from tests.central.support import ROOT, ApplianceClient, Harness, KeyClient, Reply, call, dumps

# --- expected answers ------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    status: int
    code: str | None = None  # the problem code, for errors

    def __str__(self) -> str:
        return f"{self.status} {self.code}" if self.code else str(self.status)


OK = Expect(200)
CREATED = Expect(201)
ACCEPTED = Expect(202)
NO_CONTENT = Expect(204)
MISSING = Expect(401, "missing-credentials")  # no Authorization header
BAD_KEY = Expect(401, "bad-credentials")  # an unknown bearer key
FORBIDDEN = Expect(403, "forbidden")  # a key of the wrong role
NOT_FOUND = Expect(404, "not-found")  # another partner's object: it does not exist
CONFLICT = Expect(409, "conflict")  # allowed, but the state does not call for it
UNSIGNED = Expect(401, "malformed-signature-header")  # no RFC 9421 signature
UNKNOWN_KEY = Expect(401, "unknown-key")  # signed by a key no appliance holds
WRONG_APPLIANCE = Expect(403, "wrong-appliance")  # another appliance's path
REVOKED = Expect(403, "appliance-revoked")

# The kinds of caller, in the column order of ROWS.
#
# anonymous             no credentials at all
# unknown_credentials   a bearer key the server never issued; for appliance
#                       endpoints, a request signed by a key never enrolled
# wrong_role            the admin key on partner endpoints, partner A's key on
#                       admin endpoints (the admin key on the catalogue, which
#                       any key may read); for appliance endpoints partner A's
#                       bearer key, the owner of the appliance, unsigned
# wrong_partner         partner B's key on partner A's objects; for appliance
#                       endpoints partner B's appliance signing for A's path
# other_site_appliance  an appliance of another site of partner A signing for
#                       this appliance's path (partner endpoints: signed, no key)
# revoked_appliance     an appliance of the site whose certificate partner A
#                       revoked, on its own paths (partner endpoints: signed)
# right_caller          the admin, partner A, or the appliance itself
CALLERS = (
    "anonymous",
    "unknown_credentials",
    "wrong_role",
    "wrong_partner",
    "other_site_appliance",
    "revoked_appliance",
    "right_caller",
)


@dataclass(frozen=True)
class Row:
    method: str
    path: str
    expect: tuple[Expect, ...]  # one per caller, in CALLERS order

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def kind(self) -> str:
        """admin, partner, catalogue or appliance, from the OpenAPI security."""
        security = next(
            s for m, p, _, s, _, _ in OPERATIONS if (m.upper(), p) == (self.method, self.path)
        )
        kinds = {
            id(ADMIN): "admin",
            id(PARTNER): "partner",
            id(ANY_KEY): "catalogue",
            id(APPLIANCE): "appliance",
        }
        return kinds[id(security)]


def row(method: str, path: str, *expect: Expect) -> Row:
    assert len(expect) == len(CALLERS), path
    return Row(method, path, expect)


# fmt: off
ROWS = [
    #    endpoint                                                       anonymous  unknown      wrong_role  wrong_partner    other_site       revoked   right
    row("GET",  "/api/v1/frameworks",                                  MISSING,   BAD_KEY,     OK,         OK,              MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/frameworks/{framework_id}",                   MISSING,   BAD_KEY,     OK,         OK,              MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/runbooks",                                    MISSING,   BAD_KEY,     OK,         OK,              MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/presets",                                     MISSING,   BAD_KEY,     OK,         OK,              MISSING,         MISSING,  OK),
    row("POST", "/api/v1/partners",                                    MISSING,   BAD_KEY,     FORBIDDEN,  FORBIDDEN,       MISSING,         MISSING,  CREATED),
    row("GET",  "/api/v1/partners",                                    MISSING,   BAD_KEY,     FORBIDDEN,  FORBIDDEN,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/central-log/export",                          MISSING,   BAD_KEY,     FORBIDDEN,  FORBIDDEN,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/partner",                                     MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("PUT",  "/api/v1/partner/defaults",                            MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("POST", "/api/v1/partner/apply-preset",                        MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/sites",                                       MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("POST", "/api/v1/sites",                                       MISSING,   BAD_KEY,     FORBIDDEN,  CREATED,         MISSING,         MISSING,  CREATED),
    row("GET",  "/api/v1/sites/{site_id}",                             MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("PUT",  "/api/v1/sites/{site_id}/overrides",                   MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("POST", "/api/v1/sites/{site_id}/apply-preset",                MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/sites/{site_id}/effective-config",            MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/framework-usage",                             MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("POST", "/api/v1/sites/{site_id}/enrollment-tokens",           MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  CREATED),
    row("GET",  "/api/v1/sites/{site_id}/appliances",                  MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/appliances",                                  MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/appliances/summary",                          MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/sites/{site_id}/evidence",                    MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/sites/{site_id}/posture",                     MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/sites/{site_id}/posture/oscal",               MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/sites/{site_id}/posture/trend",               MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/sites/{site_id}/evidence/{appliance_id}/{bundle_id}",        MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/sites/{site_id}/appliances/{appliance_id}/audit-export",     MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/sites/{site_id}/appliances/{appliance_id}/audit-log/generations", MISSING, BAD_KEY, FORBIDDEN, NOT_FOUND,   MISSING,         MISSING,  OK),
    # Nothing refused the appliance's log: the right caller is told there is nothing to approve.
    row("POST", "/api/v1/sites/{site_id}/appliances/{appliance_id}/audit-log/approve-new", MISSING, BAD_KEY, FORBIDDEN, NOT_FOUND,   MISSING,         MISSING,  CONFLICT),
    row("GET",  "/api/v1/sites/{site_id}/auditor-package",             MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("POST", "/api/v1/sites/{site_id}/manual-evidence",             MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  CREATED),
    row("GET",  "/api/v1/sites/{site_id}/manual-evidence",             MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/sites/{site_id}/manual-evidence/{attachment_id}",            MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/sites/{site_id}/manual-evidence/{attachment_id}/document",   MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/sites/{site_id}/manual-evidence/{attachment_id}/proof",      MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/posture",                                     MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("POST", "/api/v1/certificates/{serial}/revoke",                MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/escalations",                                 MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("POST", "/api/v1/escalations/{appliance_id}/{escalation_id}/acknowledge",     MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/security-alerts",                             MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("GET",  "/api/v1/notification-channels",                       MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("POST", "/api/v1/notification-channels",                       MISSING,   BAD_KEY,     FORBIDDEN,  CREATED,         MISSING,         MISSING,  CREATED),
    row("GET",  "/api/v1/notification-channels/{channel_id}",          MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("POST", "/api/v1/notification-channels/{channel_id}/test",     MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  ACCEPTED),
    row("GET",  "/api/v1/notification-deliveries",                     MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("DELETE", "/api/v1/notification-channels/{channel_id}",        MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  NO_CONTENT),
    row("POST", "/api/v1/appliances/{appliance_id}/certificates",      UNSIGNED,  UNKNOWN_KEY, UNSIGNED,   WRONG_APPLIANCE, WRONG_APPLIANCE, REVOKED,  CREATED),
    row("GET",  "/api/v1/revocations",                                 UNSIGNED,  UNKNOWN_KEY, UNSIGNED,   OK,              OK,              OK,       OK),
    row("POST", "/api/v1/appliances/{appliance_id}/heartbeat",         UNSIGNED,  UNKNOWN_KEY, UNSIGNED,   WRONG_APPLIANCE, WRONG_APPLIANCE, REVOKED,  OK),
    row("GET",  "/api/v1/appliances/{appliance_id}/bundles/{kind}",    UNSIGNED,  UNKNOWN_KEY, UNSIGNED,   WRONG_APPLIANCE, WRONG_APPLIANCE, REVOKED,  OK),
    row("POST", "/api/v1/appliances/{appliance_id}/audit/sync",        UNSIGNED,  UNKNOWN_KEY, UNSIGNED,   WRONG_APPLIANCE, WRONG_APPLIANCE, REVOKED,  OK),
    row("POST", "/api/v1/appliances/{appliance_id}/evidence",          UNSIGNED,  UNKNOWN_KEY, UNSIGNED,   WRONG_APPLIANCE, WRONG_APPLIANCE, REVOKED,  CREATED),
    row("POST", "/api/v1/appliances/{appliance_id}/escalations",       UNSIGNED,  UNKNOWN_KEY, UNSIGNED,   WRONG_APPLIANCE, WRONG_APPLIANCE, REVOKED,  CREATED),
    # Lifecycle: last, the ones that take something out of service at the very end.
    row("GET",    "/api/v1/sites/{site_id}/enrollment-tokens",         MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("DELETE", "/api/v1/sites/{site_id}/enrollment-tokens/{token_id}",             MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("PATCH",  "/api/v1/partner/defaults",                          MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("PATCH",  "/api/v1/sites/{site_id}/overrides",                 MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("PATCH",  "/api/v1/sites/{site_id}",                           MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",    "/api/v1/api-keys",                                  MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("POST",   "/api/v1/api-keys",                                  MISSING,   BAD_KEY,     FORBIDDEN,  CREATED,         MISSING,         MISSING,  CREATED),
    row("POST",   "/api/v1/api-keys/{key_id}/rotate",                  MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  CREATED),
    row("DELETE", "/api/v1/api-keys/{key_id}",                         MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("GET",    "/api/v1/me",                                        MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    # A key has no sessions to end: only a console user may call it.
    row("DELETE", "/api/v1/me/sessions",                               MISSING,   BAD_KEY,     FORBIDDEN,  FORBIDDEN,       MISSING,         MISSING,  FORBIDDEN),
    row("GET",    "/api/v1/users",                                     MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("PATCH",  "/api/v1/users/{user_id}",                           MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("DELETE", "/api/v1/users/{user_id}",                           MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  NO_CONTENT),
    row("GET",    "/api/v1/user-invites",                              MISSING,   BAD_KEY,     FORBIDDEN,  OK,              MISSING,         MISSING,  OK),
    row("POST",   "/api/v1/user-invites",                              MISSING,   BAD_KEY,     FORBIDDEN,  CREATED,         MISSING,         MISSING,  CREATED),
    row("DELETE", "/api/v1/user-invites/{invite_id}",                  MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("POST",   "/api/v1/sites/{site_id}/appliances/{appliance_id}/decommission",   MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
    row("DELETE", "/api/v1/sites/{site_id}",                           MISSING,   BAD_KEY,     FORBIDDEN,  NOT_FOUND,       MISSING,         MISSING,  OK),
]
# fmt: on

PUBLIC = {
    ("POST", "/api/v1/enroll"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/.well-known/msp-central-key"),
    # A load balancer's health check: no credential, no tenant's data.
    ("GET", "/api/v1/health"),
}


# --- the world every walk starts from ----------------------------------------------------


@dataclass
class World:
    harness: Harness
    admin: KeyClient
    partner: KeyClient  # partner A: owns everything the paths name
    other_partner: KeyClient  # partner B
    site: str  # A's site of app, revoked and target
    other_site: str  # A's second site (sibling)
    foreign_site: str  # B's site (foreign)
    app: ApplianceClient
    sibling: ApplianceClient
    foreign: ApplianceClient
    revoked: ApplianceClient  # its certificate revoked by partner A
    target: ApplianceClient  # its serial is the one the revoke row names
    stranger: SigningKey  # never enrolled
    escalation_id: str  # raised by app
    foreign_escalation_id: str  # raised by foreign
    bundle_id: str  # evidence from app
    foreign_bundle_id: str  # evidence from foreign
    attachment_id: str  # a document partner A attached to a control of site
    channel_id: str  # partner A's webhook channel
    token_id: str  # an unused enrollment token of site
    key_id: str  # a second API key of partner A
    user_id: str  # an editor of partner A's console
    invite_id: str  # an unused invitation of partner A

    def ids_of_a(self) -> set[str]:
        assert self.partner.partner_id
        return {
            self.partner.partner_id,
            self.site,
            self.other_site,
            self.app.appliance_id,
            self.sibling.appliance_id,
            self.revoked.appliance_id,
            self.target.appliance_id,
            self.escalation_id,
            self.bundle_id,
            self.channel_id,
            self.user_id,
            self.invite_id,
        }

    def ids_of_b(self) -> set[str]:
        assert self.other_partner.partner_id
        return {
            self.other_partner.partner_id,
            self.foreign_site,
            self.foreign.appliance_id,
            self.foreign_escalation_id,
            self.foreign_bundle_id,
        }


def escalation_document(owner: ApplianceClient) -> dict[str, Any]:
    return Escalation(
        escalation_id=f"esc-{secrets.token_hex(8)}",
        appliance_id=owner.appliance_id,
        site_id=owner.site_id,
        severity="high",
        title="Nightly backup failed three times",
        detail={"job": "nightly", "attempts": 3},
        created_at=owner.clock(),
    ).to_wire()


def evidence_envelope(owner: ApplianceClient) -> Envelope:
    return sign_evidence(
        owner.key,
        EvidenceBundle(
            bundle_id=f"ev-{secrets.token_hex(8)}",
            site_id=owner.site_id,
            appliance_id=owner.appliance_id,
            check_id="time-sync",
            controls={"hipaa": ("164.312(b)",)},
            result="pass",
            observed={"offset_ms": 3},
            collected_at=owner.clock(),
            log_index=1000,  # not witnessed yet: stored with in_log null
        ),
    )


def expect_status(reply: Reply, status: int) -> Reply:
    assert reply.status == status, (reply.status, reply.body)
    return reply


async def build_world(harness: Harness) -> World:
    admin = await harness.admin()
    partner = await harness.partner("Acme MSP")
    other_partner = await harness.partner("Rival MSP")
    defaults = {"tier": "basic", "frameworks": ["hipaa"]}
    expect_status(await partner.request("PUT", "/api/v1/partner/defaults", defaults), 200)
    site = await harness.site(partner, "Clinic")
    other_site = await harness.site(partner, "Branch clinic")
    foreign_site = await harness.site(other_partner, "Rival clinic")
    app = await harness.enroll(partner, site)
    sibling = await harness.enroll(partner, other_site)
    foreign = await harness.enroll(other_partner, foreign_site)
    revoked = await harness.enroll(partner, site)
    target = await harness.enroll(partner, site)
    stranger = SigningKey.generate()

    escalations, bundles = [], []
    for appliance in (app, foreign):
        appliance.grow(3)
        expect_status(await appliance.sync(appliance.batch(0)), 200)
        # A checkpoint by a key never delegated: refused, and a security alert.
        refused = await appliance.sync(appliance.batch(0, signer=stranger))
        assert (refused.status, refused.code) == (422, "unknown-key"), refused.body
        document = escalation_document(appliance)
        path = f"/api/v1/appliances/{appliance.appliance_id}/escalations"
        expect_status(await appliance.request("POST", path, document), 201)
        escalations.append(document["escalation_id"])
        envelope = evidence_envelope(appliance)
        path = f"/api/v1/appliances/{appliance.appliance_id}/evidence"
        expect_status(await appliance.request("POST", path, envelope), 201)
        bundles.append(json.loads(envelope.payload_bytes())["bundle_id"])
    revoke = f"/api/v1/certificates/{revoked.serial}/revoke"
    expect_status(await partner.request("POST", revoke, {"reason": "stolen"}), 200)
    attached = expect_status(
        await partner.request("POST", f"/api/v1/sites/{site}/manual-evidence", DOCUMENT), 201
    )
    channel = expect_status(
        await partner.request("POST", "/api/v1/notification-channels", WEBHOOK), 201
    )
    token = expect_status(
        await partner.request("POST", f"/api/v1/sites/{site}/enrollment-tokens", {}), 201
    )
    key = expect_status(await partner.request("POST", "/api/v1/api-keys", {"name": "ci"}), 201)
    async with harness.engine.begin() as connection:
        assert partner.partner_id
        user_id = await create_user(
            connection,
            partner_id=partner.partner_id,
            email="editor@acme.example",
            password="correct horse battery staple",
            role="editor",
            actor="test",
            now=harness.clock(),
        )
    invite = expect_status(
        await partner.request(
            "POST", "/api/v1/user-invites", {"email": "later@acme.example", "role": "viewer"}
        ),
        201,
    )
    return World(
        harness=harness,
        admin=admin,
        partner=partner,
        other_partner=other_partner,
        site=site,
        other_site=other_site,
        foreign_site=foreign_site,
        app=app,
        sibling=sibling,
        foreign=foreign,
        revoked=revoked,
        target=target,
        stranger=stranger,
        escalation_id=escalations[0],
        foreign_escalation_id=escalations[1],
        bundle_id=bundles[0],
        foreign_bundle_id=bundles[1],
        attachment_id=attached.body["id"],
        channel_id=channel.body["channel"]["id"],
        token_id=token.body["id"],
        key_id=key.body["key"]["id"],
        user_id=user_id,
        invite_id=invite.body["invite"]["id"],
    )


# --- request bodies (the same for every caller: authentication comes first) --------------


def renewal(world: World, owner: ApplianceClient) -> dict[str, Any]:
    request = make_delegation_request(
        purpose="renew",
        audience=ROOT.key_id,
        subject=owner.key,
        scopes=(Scope.AUDIT, Scope.EVIDENCE),
        current=(owner.serial, owner.key),
        created=owner.clock(),
    )
    return {"request": request.to_wire()}


def heartbeat(world: World, owner: ApplianceClient) -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "log_size": len(owner.records),
        "queues": {"urgent": 0},
        "clock": format_time(owner.clock()),
    }


def sync_batch(world: World, owner: ApplianceClient) -> Any:
    """The entries the server has not witnessed yet (a fresh log for an
    appliance that never synced)."""
    witnessed = len(owner.records)
    owner.grow(2 if witnessed else 3)
    return owner.batch(witnessed)


Body = Callable[[World, ApplianceClient], Any]

DOCUMENT = {
    "framework_id": "hipaa",
    "control_id": "164.308(a)(1)(ii)(A)",
    "filename": "risk-analysis.pdf",
    "media_type": "application/pdf",
    "content": "JVBERi0xLjcK",
}

# Nothing listens there: deliveries to it fail, which no row looks at.
WEBHOOK = {"kind": "webhook", "url": "http://127.0.0.1:9/hooks/msp"}

BODIES: dict[str, Body] = {
    "POST /api/v1/notification-channels": lambda w, o: WEBHOOK,
    "POST /api/v1/sites/{site_id}/manual-evidence": lambda w, o: DOCUMENT,
    "POST /api/v1/partners": lambda w, o: {"name": "Newco MSP"},
    "POST /api/v1/sites/{site_id}/appliances/{appliance_id}/audit-log/approve-new": lambda w, o: {
        "reason": "the appliance's disk failed"
    },
    "PUT /api/v1/partner/defaults": lambda w, o: {
        "industry": "healthcare",
        "tier": "full",
        "frameworks": ["hipaa", "nist_csf"],
    },
    "POST /api/v1/partner/apply-preset": lambda w, o: {"preset": "finance"},
    "POST /api/v1/sites": lambda w, o: {"name": "Dental practice"},
    "PUT /api/v1/sites/{site_id}/overrides": lambda w, o: {"tier": "full", "frameworks": ["soc2"]},
    "POST /api/v1/sites/{site_id}/apply-preset": lambda w, o: {"preset": "healthcare"},
    "POST /api/v1/sites/{site_id}/enrollment-tokens": lambda w, o: {"hours": 2},
    "POST /api/v1/certificates/{serial}/revoke": lambda w, o: {"reason": "lost in transit"},
    "POST /api/v1/appliances/{appliance_id}/certificates": renewal,
    "POST /api/v1/appliances/{appliance_id}/heartbeat": heartbeat,
    "POST /api/v1/appliances/{appliance_id}/audit/sync": sync_batch,
    "POST /api/v1/appliances/{appliance_id}/evidence": lambda w, o: evidence_envelope(o),
    "POST /api/v1/appliances/{appliance_id}/escalations": lambda w, o: escalation_document(o),
    "PATCH /api/v1/partner/defaults": lambda w, o: {"tier": "full"},
    "PATCH /api/v1/sites/{site_id}/overrides": lambda w, o: {"industry": "finance"},
    "PATCH /api/v1/sites/{site_id}": lambda w, o: {"name": "Clinic North"},
    "POST /api/v1/api-keys": lambda w, o: {"name": "backup job"},
    "POST /api/v1/api-keys/{key_id}/rotate": lambda w, o: {"overlap_minutes": 30},
    "PATCH /api/v1/users/{user_id}": lambda w, o: {"role": "viewer"},
    "POST /api/v1/user-invites": lambda w, o: {"email": "new.person@example.com", "role": "editor"},
    "POST /api/v1/sites/{site_id}/appliances/{appliance_id}/decommission": lambda w, o: {
        "reason": "replaced"
    },
}


# --- what the right caller gets back ------------------------------------------------------


def _items(body: Any) -> list[dict[str, Any]]:
    """A list's items: a page's, or a plain list's."""
    if isinstance(body, dict):
        assert body["next_cursor"] is None, "a page of the default limit holds the whole world"
        items: list[dict[str, Any]] = body["items"]
        return items
    return list(body)


def _ids(items: Any, key: str = "id") -> set[str]:
    return {item[key] for item in _items(items)}


def _check_frameworks(w: World, body: Any) -> None:
    assert len(body) == 10
    assert "hipaa" in _ids(body)


def _check_partners(w: World, body: Any) -> None:
    assert {w.partner.partner_id, w.other_partner.partner_id} <= _ids(body)


def _check_partner_created(w: World, body: Any) -> None:
    assert body["partner"]["name"] == "Newco MSP"
    assert body["api_key"].startswith("mspk_")


def _check_defaults(w: World, body: Any) -> None:
    assert body["id"] == w.partner.partner_id
    assert body["defaults"] == {
        "industry": "healthcare",
        "tier": "full",
        "frameworks": ["hipaa", "nist_csf"],
    }


def _check_partner_preset(w: World, body: Any) -> None:
    assert body["id"] == w.partner.partner_id
    assert body["defaults"]["industry"] == "finance"


def _check_sites(w: World, body: Any) -> None:
    assert _ids(body) == {w.site, w.other_site}


def _check_site_created(w: World, body: Any) -> None:
    assert body["partner_id"] == w.partner.partner_id
    assert body["name"] == "Dental practice"


def _check_site(w: World, body: Any) -> None:
    assert (body["id"], body["partner_id"]) == (w.site, w.partner.partner_id)


def _check_overrides(w: World, body: Any) -> None:
    assert body["id"] == w.site
    assert body["overrides"] == {"industry": None, "tier": "full", "frameworks": ["soc2"]}
    assert body["effective"]["frameworks"] == ["soc2"]


def _check_site_preset(w: World, body: Any) -> None:
    assert body["id"] == w.site
    assert body["overrides"]["industry"] == "healthcare"


def _check_effective(w: World, body: Any) -> None:
    assert body["site_id"] == w.site


def _check_usage(w: World, body: Any) -> None:
    # A's two sites and the one POST /api/v1/sites created a moment ago.
    names = {site["site_id"]: site["name"] for site in body["sites"]}
    assert body["site_count"] == len(names) == 3
    assert {w.site, w.other_site} < set(names)
    assert "Dental practice" in names.values()


def _check_token(w: World, body: Any) -> None:
    assert body["site_id"] == w.site
    assert body["token"]


def _check_appliances(w: World, body: Any) -> None:
    status = {item["id"]: item["status"] for item in _items(body)}
    assert status == {
        w.app.appliance_id: "online",  # it synced
        w.revoked.appliance_id: "revoked",
        w.target.appliance_id: "never-seen",
    }


def _check_all_appliances(w: World, body: Any) -> None:
    status = {item["id"]: item["status"] for item in _items(body)}
    assert status == {
        w.app.appliance_id: "online",  # it synced
        w.sibling.appliance_id: "never-seen",  # the other site's
        w.revoked.appliance_id: "revoked",
        w.target.appliance_id: "never-seen",
    }


def _check_appliance_summary(w: World, body: Any) -> None:
    """The partner's four appliances (as _check_all_appliances lists
    them), counted."""
    counts = {key: body[key] for key in ("total", "online", "never_seen", "revoked")}
    assert counts == {"total": 4, "online": 1, "never_seen": 2, "revoked": 1}


def _check_evidence(w: World, body: Any) -> None:
    assert _ids(body) == {w.bundle_id}


def _check_site_posture(w: World, body: Any) -> None:
    assert body["site_id"] == w.site
    assert w.foreign_bundle_id not in json.dumps(body)


def _check_oscal(w: World, body: Any) -> None:
    (result,) = body["assessment-results"]["results"]
    assert {p["value"] for p in result["props"] if p["name"] == "site-id"} == {w.site}
    assert result["findings"]
    linked = {
        e["href"].rsplit("/", 1)[1] for o in result["observations"] for e in o["relevant-evidence"]
    }
    assert linked == {w.bundle_id}
    assert w.foreign_bundle_id not in json.dumps(body)


def _check_evidence_export(w: World, body: Any) -> None:
    assert (
        json.loads(Envelope.from_wire(body["evidence"]).payload_bytes())["bundle_id"] == w.bundle_id
    )


def _check_audit_export(w: World, body: Any) -> None:
    assert body["appliance_id"] == w.app.appliance_id


def _check_package(w: World, body: Any) -> None:
    assert body["site_id"] == w.site
    assert w.foreign_bundle_id not in json.dumps(body)


def _check_attached(w: World, body: Any) -> None:
    assert (body["site_id"], body["control_id"]) == (w.site, DOCUMENT["control_id"])


def _check_attachments(w: World, body: Any) -> None:
    assert w.attachment_id in _ids(body)


def _check_attachment(w: World, body: Any) -> None:
    assert body["id"] == w.attachment_id


def _check_document(w: World, body: Any) -> None:
    assert body == base64.b64decode(DOCUMENT["content"])


def _check_record_proof(w: World, body: Any) -> None:
    entry = check_central_record(body, [ROOT.verify_key]).unwrap()
    assert entry.data["attachment_id"] == w.attachment_id


def _check_central_log(w: World, body: Any) -> None:
    assert check_central_log_export(body, [ROOT.verify_key], at=utc_now()).ok


def _check_trend(w: World, body: Any) -> None:
    assert (body["site_id"], len(body["days"])) == (w.site, 90)


def _check_partner_posture(w: World, body: Any) -> None:
    assert {w.site, w.other_site} <= _ids(body["sites"], "site_id")  # the walk adds sites
    assert w.foreign_site not in json.dumps(body)


def _check_revoke(w: World, body: Any) -> None:
    assert (body["serial"], body["appliance_id"]) == (w.target.serial, w.target.appliance_id)


def _check_escalations(w: World, body: Any) -> None:
    assert _ids(body) == {w.escalation_id}


def _check_acknowledged(w: World, body: Any) -> None:
    assert body["id"] == w.escalation_id
    assert body["acknowledged_at"] is not None


def _check_alerts(w: World, body: Any) -> None:
    alerts = _items(body)
    assert alerts
    assert {alert["site_id"] for alert in alerts} == {w.site}
    assert {alert["code"] for alert in alerts} == {"unknown-key"}


def _check_renewed(w: World, body: Any) -> None:
    certificate = DelegationCertificate.from_json(
        Envelope.from_wire(body["certificate"]).payload_bytes()
    )
    assert certificate.appliance_id == w.app.appliance_id
    assert certificate.subject_key_id == w.app.key.key_id
    assert certificate.serial != w.app.serial


def _check_revocations(w: World, body: Any) -> None:
    revocations = RevocationList.from_json(Envelope.from_wire(body).payload_bytes())
    assert revocations.find(w.revoked.serial) is not None


def _check_heartbeat(w: World, body: Any) -> None:
    assert body["witnessed_size"] == 3


def _check_bundle(w: World, body: Any) -> None:
    payload = json.loads(Envelope.from_wire(body).payload_bytes())
    assert (payload["kind"], payload["site_id"]) == ("site-config", w.site)


def _check_synced(w: World, body: Any) -> None:
    assert body["size"] == len(w.app.records) == 5


def _check_stored(w: World, body: Any) -> None:
    assert body["stored"] is True


CHECKS: dict[str, Callable[[World, Any], None]] = {
    "GET /api/v1/frameworks": _check_frameworks,
    "GET /api/v1/frameworks/{framework_id}": lambda w, b: _check_eq(b["id"], "hipaa"),
    "GET /api/v1/runbooks": lambda w, b: _check_eq(bool(b), True),
    "GET /api/v1/presets": lambda w, b: _check_eq("healthcare" in _ids(b), True),
    "POST /api/v1/partners": _check_partner_created,
    "GET /api/v1/partners": _check_partners,
    "GET /api/v1/partner": lambda w, b: _check_eq(b["id"], w.partner.partner_id),
    "PUT /api/v1/partner/defaults": _check_defaults,
    "POST /api/v1/partner/apply-preset": _check_partner_preset,
    "GET /api/v1/sites": _check_sites,
    "POST /api/v1/sites": _check_site_created,
    "GET /api/v1/sites/{site_id}": _check_site,
    "PUT /api/v1/sites/{site_id}/overrides": _check_overrides,
    "POST /api/v1/sites/{site_id}/apply-preset": _check_site_preset,
    "GET /api/v1/sites/{site_id}/effective-config": _check_effective,
    "GET /api/v1/framework-usage": _check_usage,
    "POST /api/v1/sites/{site_id}/enrollment-tokens": _check_token,
    "GET /api/v1/sites/{site_id}/appliances": _check_appliances,
    "GET /api/v1/appliances": _check_all_appliances,
    "GET /api/v1/appliances/summary": _check_appliance_summary,
    "GET /api/v1/sites/{site_id}/evidence": _check_evidence,
    "GET /api/v1/sites/{site_id}/posture": _check_site_posture,
    "GET /api/v1/sites/{site_id}/posture/oscal": _check_oscal,
    "GET /api/v1/sites/{site_id}/posture/trend": _check_trend,
    "GET /api/v1/posture": _check_partner_posture,
    "POST /api/v1/sites/{site_id}/manual-evidence": _check_attached,
    "GET /api/v1/sites/{site_id}/manual-evidence": _check_attachments,
    "GET /api/v1/sites/{site_id}/manual-evidence/{attachment_id}": _check_attachment,
    "GET /api/v1/sites/{site_id}/manual-evidence/{attachment_id}/document": _check_document,
    "GET /api/v1/sites/{site_id}/manual-evidence/{attachment_id}/proof": _check_record_proof,
    "GET /api/v1/central-log/export": _check_central_log,
    "GET /api/v1/sites/{site_id}/auditor-package": _check_package,
    "GET /api/v1/sites/{site_id}/evidence/{appliance_id}/{bundle_id}": _check_evidence_export,
    "GET /api/v1/sites/{site_id}/appliances/{appliance_id}/audit-export": _check_audit_export,
    "GET /api/v1/sites/{site_id}/appliances/{appliance_id}/audit-log/generations": (
        lambda w, b: _check_eq(
            (b["appliance_id"], b["current_generation"]), (w.app.appliance_id, 1)
        )
    ),
    "POST /api/v1/sites/{site_id}/appliances/{appliance_id}/audit-log/approve-new": (
        lambda w, b: _check_eq(
            b["detail"], "nothing to approve: the server has not refused this appliance's log"
        )
    ),
    "POST /api/v1/certificates/{serial}/revoke": _check_revoke,
    "GET /api/v1/escalations": _check_escalations,
    "POST /api/v1/escalations/{appliance_id}/{escalation_id}/acknowledge": _check_acknowledged,
    "GET /api/v1/security-alerts": _check_alerts,
    "GET /api/v1/notification-channels": lambda w, b: _check_eq(w.channel_id in _ids(b), True),
    "POST /api/v1/notification-channels": lambda w, b: _check_eq(
        (b["channel"]["url"], b["secret"][:6]), (WEBHOOK["url"], "whsec_")
    ),
    "GET /api/v1/notification-channels/{channel_id}": lambda w, b: _check_eq(b["id"], w.channel_id),
    "POST /api/v1/notification-channels/{channel_id}/test": lambda w, b: _check_eq(
        b["event_id"][:4], "evt_"
    ),
    "GET /api/v1/notification-deliveries": lambda w, b: _check_eq(
        {d["channel_id"] for d in b["items"]}, {w.channel_id}
    ),
    "DELETE /api/v1/notification-channels/{channel_id}": lambda w, b: _check_eq(b, b""),
    "GET /api/v1/me": lambda w, b: _check_eq(
        (b["kind"], b["role"], b["partner_id"]), ("key", "admin", w.partner.partner_id)
    ),
    "DELETE /api/v1/me/sessions": lambda w, b: _check_eq(b["code"], "forbidden"),
    "GET /api/v1/users": lambda w, b: _check_eq(w.user_id in _ids(b["items"]), True),
    "PATCH /api/v1/users/{user_id}": lambda w, b: _check_eq(
        (b["id"], b["role"]), (w.user_id, "viewer")
    ),
    "DELETE /api/v1/users/{user_id}": lambda w, b: _check_eq(b, b""),
    "GET /api/v1/user-invites": lambda w, b: _check_eq(w.invite_id in _ids(b["items"]), True),
    "POST /api/v1/user-invites": lambda w, b: _check_eq(
        (b["invite"]["role"], b["link"].split("#")[1][:8], b["emailed"]),
        ("editor", "msp_inv_", False),
    ),
    "DELETE /api/v1/user-invites/{invite_id}": lambda w, b: _check_eq(
        (b["id"], b["state"]), (w.invite_id, "revoked")
    ),
    "POST /api/v1/appliances/{appliance_id}/certificates": _check_renewed,
    "GET /api/v1/revocations": _check_revocations,
    "POST /api/v1/appliances/{appliance_id}/heartbeat": _check_heartbeat,
    "GET /api/v1/appliances/{appliance_id}/bundles/{kind}": _check_bundle,
    "POST /api/v1/appliances/{appliance_id}/audit/sync": _check_synced,
    "POST /api/v1/appliances/{appliance_id}/evidence": _check_stored,
    "POST /api/v1/appliances/{appliance_id}/escalations": _check_stored,
    "GET /api/v1/sites/{site_id}/enrollment-tokens": lambda w, b: _check_eq(
        w.token_id in _ids(b["items"]), True
    ),
    "DELETE /api/v1/sites/{site_id}/enrollment-tokens/{token_id}": lambda w, b: _check_eq(
        (b["id"], b["state"]), (w.token_id, "revoked")
    ),
    "PATCH /api/v1/partner/defaults": lambda w, b: _check_eq(
        (b["id"], b["defaults"]["tier"]), (w.partner.partner_id, "full")
    ),
    "PATCH /api/v1/sites/{site_id}/overrides": lambda w, b: _check_eq(
        (b["id"], b["overrides"]["industry"]), (w.site, "finance")
    ),
    "PATCH /api/v1/sites/{site_id}": lambda w, b: _check_eq(
        (b["id"], b["name"]), (w.site, "Clinic North")
    ),
    "GET /api/v1/api-keys": lambda w, b: _check_eq(w.key_id in _ids(b["items"]), True),
    "POST /api/v1/api-keys": lambda w, b: _check_eq(b["key"]["name"], "backup job"),
    "POST /api/v1/api-keys/{key_id}/rotate": lambda w, b: _check_eq(
        (b["previous"]["id"], b["previous"]["state"], b["key"]["name"]),
        (w.key_id, "expiring", "ci"),
    ),
    "DELETE /api/v1/api-keys/{key_id}": lambda w, b: _check_eq(
        (b["id"], b["state"]), (w.key_id, "revoked")
    ),
    "POST /api/v1/sites/{site_id}/appliances/{appliance_id}/decommission": lambda w, b: _check_eq(
        (b["id"], w.app.serial in b["revoked_serials"]), (w.app.appliance_id, True)
    ),
    "DELETE /api/v1/sites/{site_id}": lambda w, b: _check_eq(
        (b["id"], b["decommissioned_at"] is not None), (w.site, True)
    ),
}


def _check_eq(actual: Any, expected: Any) -> None:
    assert actual == expected, (actual, expected)


# --- sending one cell -----------------------------------------------------------------


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def credentials(world: World, caller: str, row: Row, path: str, body: bytes) -> dict[str, str]:
    if caller == "anonymous":
        return {}
    if row.kind == "appliance":
        if caller == "unknown_credentials":
            return world.app.signed(row.method, path, body, key=world.stranger)
        if caller == "wrong_role":
            return bearer(world.partner.key)
        signer = {
            "wrong_partner": world.foreign,
            "other_site_appliance": world.sibling,
            "revoked_appliance": world.revoked,
            "right_caller": world.app,
        }[caller]
        return signer.signed(row.method, path, body)
    if caller == "unknown_credentials":
        return bearer(f"mspk_{secrets.token_hex(32)}")
    if caller == "wrong_role":
        return bearer(world.partner.key if row.kind == "admin" else world.admin.key)
    if caller == "wrong_partner":
        return bearer(world.other_partner.key)
    if caller == "other_site_appliance":
        return world.sibling.signed(row.method, path, body)
    if caller == "revoked_appliance":
        return world.revoked.signed(row.method, path, body)
    return bearer(world.admin.key if row.kind == "admin" else world.partner.key)


async def send(world: World, caller: str, row: Row) -> Reply:
    # The revoked appliance speaks for itself; every other appliance signs for
    # the paths (and with the documents) of app.
    owner = world.revoked if caller == "revoked_appliance" else world.app
    path = row.path.format(
        framework_id="hipaa",
        site_id=world.site,
        serial=world.target.serial,
        escalation_id=world.escalation_id,
        appliance_id=owner.appliance_id,
        kind="site-config",
        bundle_id=world.bundle_id,
        attachment_id=world.attachment_id,
        channel_id=world.channel_id,
        token_id=world.token_id,
        key_id=world.key_id,
        user_id=world.user_id,
        invite_id=world.invite_id,
    )
    make_body = BODIES.get(row.label)
    body = dumps(make_body(world, owner)) if make_body else None
    headers = credentials(world, caller, row, path, body or b"")
    return await call(world.harness.client, row.method, path, body=body, headers=headers)


async def walk(world: World, caller: str) -> list[str]:
    """Send every row as ``caller``; return the cells that answered otherwise."""
    column = CALLERS.index(caller)
    foreign_ids = world.ids_of_a()
    mismatches: list[str] = []
    for entry in ROWS:
        want = entry.expect[column]
        try:
            reply = await send(world, caller, entry)
        except (AssertionError, jsonschema.ValidationError) as exc:
            mismatches.append(f"{entry.label}: response breaks the OpenAPI document: {exc}")
            continue
        got = Expect(reply.status, reply.code if reply.status >= 400 else None)
        if got != want:
            detail = reply.body.get("detail") if isinstance(reply.body, dict) else None
            mismatches.append(f"{entry.label}: expected {want}, got {got} ({detail})")
            continue
        if caller == "right_caller":
            try:
                CHECKS[entry.label](world, reply.body)
            except AssertionError as exc:
                mismatches.append(f"{entry.label}: unexpected body: {exc!r}")
        elif caller == "wrong_partner" and entry.kind != "appliance" and reply.status < 300:
            text = json.dumps(reply.body)
            leaked = sorted(i for i in foreign_ids if i in text)
            if leaked:
                mismatches.append(f"{entry.label}: partner B sees partner A's {leaked}")
    return mismatches


async def partner_view(world: World) -> dict[str, Any]:
    """Everything partner A (and the admin) can see of A's world."""
    paths = [
        "/api/v1/partner",
        "/api/v1/sites",
        f"/api/v1/sites/{world.site}/appliances",
        f"/api/v1/sites/{world.other_site}/appliances",
        "/api/v1/appliances",
        f"/api/v1/sites/{world.site}/evidence",
        f"/api/v1/sites/{world.site}/effective-config",
        "/api/v1/escalations",
        "/api/v1/security-alerts",
        "/api/v1/framework-usage",
    ]
    view = {
        path: expect_status(await world.partner.request("GET", path), 200).body for path in paths
    }
    partners = expect_status(await world.admin.request("GET", "/api/v1/partners"), 200).body
    view["partner ids"] = sorted(_ids(partners))
    return view


# --- the tests ----------------------------------------------------------------------------


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """The matrix sends an unknown credential to every operation from one
    address: failures are counted generously here, so that each answer is
    the operation's own refusal (test_credential_throttling.py covers the
    throttle)."""
    return Settings(
        state_dir=tmp_path / "state",
        database_url=database_url,
        credential_identity_failures=1000,
        credential_source_failures=1_000_000,
        credential_source_flood=1_000_000,
        credential_alert_failures=1_000_000,
    )


def test_the_matrix_covers_every_authenticated_operation() -> None:
    operations = {(method.upper(), path) for method, path, *_ in OPERATIONS}
    rows = [(r.method, r.path) for r in ROWS]
    assert len(rows) == len(set(rows))
    assert set(rows) == operations - PUBLIC
    assert set(BODIES) <= {r.label for r in ROWS}
    assert set(CHECKS) == {r.label for r in ROWS}
    public = {(m.upper(), p) for m, p, _, security, _, _ in OPERATIONS if security is NONE}
    assert public == PUBLIC
    kinds = {r.label: r.kind for r in ROWS}
    assert set(kinds.values()) == {"admin", "partner", "catalogue", "appliance"}


@pytest.mark.parametrize("caller", CALLERS)
async def test_authorization_matrix(harness: Harness, caller: str) -> None:
    world = await build_world(harness)
    before = await partner_view(world)
    mismatches = await walk(world, caller)
    if caller != "right_caller":
        after = await partner_view(world)
        mismatches += [
            f"a call refused to {caller} changed partner A's {name}"
            for name in before
            if before[name] != after[name]
        ]
    assert not mismatches, (
        f"{len(mismatches)} of {len(ROWS)} cells for {caller} answered otherwise:\n  "
        + "\n  ".join(mismatches)
    )


async def test_partner_listings_hold_only_their_own_objects(harness: Harness) -> None:
    world = await build_world(harness)
    cases = [
        (world.partner, [world.site, world.other_site], world.escalation_id, world.bundle_id,
         world.ids_of_b()),
        (world.other_partner, [world.foreign_site], world.foreign_escalation_id,
         world.foreign_bundle_id, world.ids_of_a()),
    ]  # fmt: skip
    problems: list[str] = []
    for partner, sites, escalation_id, bundle_id, others in cases:
        listings = {
            path: expect_status(await partner.request("GET", path), 200).body
            for path in [
                "/api/v1/sites",
                "/api/v1/escalations",
                "/api/v1/security-alerts",
                "/api/v1/framework-usage",
                "/api/v1/appliances",
                *(f"/api/v1/sites/{site}/evidence" for site in sites),
                *(f"/api/v1/sites/{site}/appliances" for site in sites),
            ]
        }
        for path, body in listings.items():
            leaked = sorted(i for i in others if i in json.dumps(body))
            if leaked:
                problems.append(f"{partner.partner_id} {path} shows the other partner's {leaked}")
        # ... and each listing does hold the partner's own objects.
        expected = {
            "/api/v1/sites": (_ids(listings["/api/v1/sites"]), set(sites)),
            "/api/v1/escalations": (
                _ids(listings["/api/v1/escalations"]),
                {escalation_id},
            ),
            "/api/v1/security-alerts": (
                {a["site_id"] for a in _items(listings["/api/v1/security-alerts"])},
                {sites[0]},
            ),
            "/api/v1/framework-usage": (
                _ids(listings["/api/v1/framework-usage"]["sites"], "site_id"),
                set(sites),
            ),
            "evidence": (
                {
                    e["id"]
                    for site in sites
                    for e in _items(listings[f"/api/v1/sites/{site}/evidence"])
                },
                {bundle_id},
            ),
        }
        for name, (actual, wanted) in expected.items():
            if actual != wanted:
                problems.append(
                    f"{partner.partner_id} {name}: {sorted(actual)} != {sorted(wanted)}"
                )
    assert not problems, "\n".join(problems)


async def test_enrollment_is_public_and_guarded_by_its_token(harness: Harness) -> None:
    partner = await harness.partner()
    other = await harness.partner("Rival MSP")
    site = await harness.site(partner)

    def request(token: str, key: SigningKey, *, digest_of: str | None = None) -> bytes:
        envelope = make_delegation_request(
            purpose="enroll",
            audience=ROOT.key_id,
            subject=key,
            scopes=(Scope.AUDIT,),
            enrollment_token=digest_of or token,
            created=harness.clock(),
        )
        return dumps({"token": token, "request": envelope.to_wire()})

    async def enroll(body: bytes | None, headers: dict[str, str] | None = None) -> Reply:
        return await call(harness.client, "POST", "/api/v1/enroll", body=body, headers=headers)

    key, thief = SigningKey.generate(), SigningKey.generate()
    token = await harness.token(partner, site)
    unknown = f"msp-enroll_{secrets.token_hex(32)}"
    expired = expect_status(
        await partner.request("POST", f"/api/v1/sites/{site}/enrollment-tokens", {"hours": 1}), 201
    ).body["token"]

    cells: list[tuple[str, Callable[[], Any], Expect]] = [
        ("no credentials, no body", lambda: enroll(None), Expect(400, "malformed-json")),
        ("no token", lambda: enroll(dumps({})), Expect(400, "malformed-document")),
        # A key of any role is no substitute for the token.
        ("partner key, no token", lambda: enroll(dumps({}), bearer(partner.key)),
         Expect(400, "malformed-document")),
        ("unknown token", lambda: enroll(request(unknown, key)), Expect(403, "bad-enrollment-token")),
        # A stolen token paired with a request made for another token.
        ("token not in the request", lambda: enroll(request(token, thief, digest_of=unknown)),
         Expect(422, "delegation-request-refused")),
        ("valid token", lambda: enroll(request(token, key)), CREATED),
        ("lost answer, same token and key", lambda: enroll(request(token, key)), OK),
        ("used token, another key", lambda: enroll(request(token, thief)),
         Expect(403, "bad-enrollment-token")),
        ("another partner's key and a used token", lambda: enroll(request(token, thief), bearer(other.key)),
         Expect(403, "bad-enrollment-token")),
    ]  # fmt: skip
    mismatches = []
    answers: dict[str, Reply] = {}
    for label, send_cell, want in cells:
        reply = await send_cell()
        answers[label] = reply
        got = Expect(reply.status, reply.code if reply.status >= 400 else None)
        if got != want:
            mismatches.append(f"{label}: expected {want}, got {got} ({reply.body})")
    harness.clock.advance(timedelta(hours=2))
    reply = await enroll(request(expired, key))
    if (reply.status, reply.code) != (403, "bad-enrollment-token"):
        mismatches.append(f"expired token: got {reply.status} {reply.code}")
    assert not mismatches, "\n".join(mismatches)
    first, again = answers["valid token"].body, answers["lost answer, same token and key"].body
    assert first == again
    assert first["site_id"] == site


async def rotate(app: ApplianceClient) -> tuple[SigningKey, str]:
    return await app.rotate()


async def test_a_rotation_hands_authority_to_the_new_key(harness: Harness) -> None:
    partner = await harness.partner()
    app = await harness.enroll(partner)
    path = f"/api/v1/appliances/{app.appliance_id}/bundles/site-config"
    new, serial = await rotate(app)
    # Until the new key is used, the current one still speaks for the appliance.
    expect_status(await app.request("GET", path), 200)
    expect_status(await app.request("GET", path, key=new), 200)
    # From the new key's first request on, the replaced key is no one's.
    reply = await app.request("GET", path)
    assert (reply.status, reply.code) == (401, "unknown-key")
    (listed,) = expect_status(
        await partner.request("GET", f"/api/v1/sites/{app.site_id}/appliances"), 200
    ).body["items"]
    assert listed["certificate_serial"] == serial


async def test_a_revoked_rotation_is_refused_and_leaves_the_current_key_working(
    harness: Harness,
) -> None:
    """The partner revokes the certificate of a rotation before the appliance
    used it: requests under the new key are refused as revoked, and the
    appliance keeps acting under its current (not revoked) certificate."""
    partner = await harness.partner()
    app = await harness.enroll(partner)
    path = f"/api/v1/appliances/{app.appliance_id}/bundles/site-config"
    new, serial = await rotate(app)
    revoke = f"/api/v1/certificates/{serial}/revoke"
    expect_status(await partner.request("POST", revoke, {"reason": "rotation leaked"}), 200)

    reply = await app.request("GET", path, key=new)
    assert (reply.status, reply.code) == (403, "appliance-revoked")
    # The refused request must not have made the revoked certificate current
    # (require_appliance promotes a rotation's certificate on its first use).
    reply = await app.request("GET", path)
    assert reply.status == 200, reply.body
    (listed,) = expect_status(
        await partner.request("GET", f"/api/v1/sites/{app.site_id}/appliances"), 200
    ).body["items"]
    assert listed["certificate_serial"] == app.serial
    assert listed["status"] != "revoked"


async def test_bearer_header_forms_and_revoked_keys(harness: Harness) -> None:
    partner = await harness.partner()
    forms = [
        (None, Expect(401, "missing-credentials")),
        ("", Expect(401, "missing-credentials")),
        (f"Basic {partner.key}", Expect(401, "bad-credentials")),
        ("Bearer", Expect(401, "bad-credentials")),
        ("Bearer    ", Expect(401, "bad-credentials")),
        (f"Bearer {partner.key}x", Expect(401, "bad-credentials")),
        (f"Bearer {partner.key}", OK),
        (f"bearer {partner.key}", OK),
    ]
    mismatches = []
    for authorization, want in forms:
        headers = {} if authorization is None else {"Authorization": authorization}
        reply = await call(harness.client, "GET", "/api/v1/partner", headers=headers)
        got = Expect(reply.status, reply.code if reply.status >= 400 else None)
        if got != want:
            mismatches.append(f"{authorization!r}: expected {want}, got {got}")
    async with harness.engine.begin() as connection:
        await connection.execute(
            sa.update(api_keys)
            .where(api_keys.c.partner_id == partner.partner_id)
            .values(revoked_at=harness.clock())
        )
    reply = await partner.request("GET", "/api/v1/partner")
    if (reply.status, reply.code) != (401, "bad-credentials"):
        mismatches.append(f"revoked key: got {reply.status} {reply.code}")
    assert not mismatches, "\n".join(mismatches)
