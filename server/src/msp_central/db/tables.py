"""The database schema, as SQLAlchemy Core tables.

The migrations in ``migrations/versions`` create and evolve exactly this
schema; a test compares the two on every backend. Times are stored as
timezone-aware UTC; binary values (hashes, canonical entry bytes) as bytes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    @property
    def python_type(self) -> type[datetime]:
        # What pagination checks a cursor's sort key against.
        return datetime

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime stored")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

ID = 64  # identifiers: msp_protocol.encoding.Identifier allows at most 64 characters

# --- the compliance catalogue (loaded from data/frameworks-vN.json by a migration)

frameworks = Table(
    "frameworks",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("edition", String(300), nullable=False),
    Column("position", Integer, nullable=False),
    Column("catalogue_version", Integer, nullable=False),
)

controls = Table(
    "controls",
    metadata,
    Column("framework_id", String(32), ForeignKey("frameworks.id"), primary_key=True),
    Column("control_id", String(64), primary_key=True),
    Column("title", String(300), nullable=False),
    Column("position", Integer, nullable=False),
)

runbooks = Table(
    "runbooks",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("title", String(200), nullable=False),
    # basic: compliance runbooks; full: adds the OS maintenance runbooks.
    Column("tier", String(16), nullable=False),
    Column("check_name", String(64), nullable=False),
    Column("l1_action", String(64), nullable=True),
    Column("description", Text, nullable=False),
)

control_runbook_mapping = Table(
    "control_runbook_mapping",
    metadata,
    Column("framework_id", String(32), primary_key=True),
    Column("control_id", String(64), primary_key=True),
    Column("runbook_id", String(ID), ForeignKey("runbooks.id"), primary_key=True),
)

presets = Table(
    "presets",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("description", Text, nullable=False),
    Column("tier", String(16), nullable=False),
    Column("frameworks", JSON, nullable=False),
    Column("position", Integer, nullable=False),
)

# --- partners, their keys and sites

partners = Table(
    "partners",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # Defaults every site inherits unless it overrides them.
    Column("industry", String(32), nullable=True),
    Column("tier", String(16), nullable=False),
    Column("frameworks", JSON, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    # SHA-256 of the key: keys are 256-bit random, so a fast hash is enough
    # (nothing to brute-force), and lookups stay one indexed read.
    Column("key_sha256", String(64), primary_key=True),
    # How listings, rotation and revocation name the key.
    Column("id", String(ID), nullable=False, unique=True),
    Column("name", String(200), nullable=False, server_default=""),
    Column("prefix", String(16), nullable=False),  # shown in listings, never enough to use
    Column("role", String(16), nullable=False),  # partner | admin
    Column("partner_id", String(ID), ForeignKey("partners.id"), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("created_by", String(128), nullable=True),  # an actor, as the central log names it
    # May lie in the future: a rotated key keeps working until then.
    Column("revoked_at", UTCDateTime, nullable=True),
)

sites = Table(
    "sites",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("partner_id", String(ID), ForeignKey("partners.id"), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # Per-site overrides; NULL inherits the partner's default.
    Column("industry", String(32), nullable=True),
    Column("tier", String(16), nullable=True),
    Column("frameworks", JSON, nullable=True),
    # A decommissioned site keeps its history for auditors; it enrolls
    # nothing more and its appliances' certificates are revoked.
    Column("decommissioned_at", UTCDateTime, nullable=True),
)

enrollment_tokens = Table(
    "enrollment_tokens",
    metadata,
    Column("token_sha256", String(64), primary_key=True),
    Column("id", String(ID), nullable=False, unique=True),  # names the token in listings
    Column("site_id", String(ID), ForeignKey("sites.id"), nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("created_by", String(128), nullable=True),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("used_at", UTCDateTime, nullable=True),
    Column("appliance_id", String(ID), nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
)

# --- appliances and their certificates

appliances = Table(
    "appliances",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("site_id", String(ID), ForeignKey("sites.id"), nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("current_serial", String(32), nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    # The last heartbeat's time; the last sync's is audit_logs.updated_at.
    Column("last_seen_at", UTCDateTime, nullable=True),
    # The last heartbeat as the appliance sent it (version, log size, queues, clock).
    Column("heartbeat", JSON, nullable=True),
    # Taken out of service by its partner: certificates revoked, history kept.
    Column("decommissioned_at", UTCDateTime, nullable=True),
)

certificates = Table(
    "certificates",
    metadata,
    Column("serial", String(32), primary_key=True),
    Column("appliance_id", String(ID), ForeignKey("appliances.id"), nullable=False, index=True),
    Column("key_id", String(16), nullable=False, index=True),
    Column("subject_key", String(64), nullable=False),
    Column("envelope", Text, nullable=False),
    Column("not_before", UTCDateTime, nullable=False),
    Column("not_after", UTCDateTime, nullable=False),
    Column("issued_at", UTCDateTime, nullable=False),
    Column("purpose", String(16), nullable=False),  # enroll | renew | rotate
    # The certificate this one replaces (renew, rotate). A rotated key becomes
    # the appliance's current one at its first signed request, so a rotation
    # whose answer was lost can be retried with the old key.
    Column("replaces", String(32), nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("cutoff_size", BigInteger, nullable=True),
    Column("revocation_reason", String(256), nullable=True),
)

revocation_lists = Table(
    "revocation_lists",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("envelope", Text, nullable=False),
    Column("issued_at", UTCDateTime, nullable=False),
)

# RFC 9421 nonces seen within the freshness window, shared by every replica.
request_nonces = Table(
    "request_nonces",
    metadata,
    Column("key_id", String(16), primary_key=True),
    Column("nonce", String(128), primary_key=True),
    Column("created", BigInteger, nullable=False, index=True),
)

# --- witnessed audit logs

# An appliance's log has generations: when its local log was lost (a corrupt
# file quarantined, a cut tail) the partner may approve a new log, which
# starts again at index 0 as the next generation. Entries, checkpoints and
# evidence of earlier generations are kept, marked by their generation.
audit_logs = Table(
    "audit_logs",
    metadata,
    Column("appliance_id", String(ID), ForeignKey("appliances.id"), primary_key=True),
    # The generation being witnessed now (1 for an appliance's first log).
    Column("generation", Integer, nullable=False, server_default="1"),
    Column("size", BigInteger, nullable=False),
    Column("root", String(64), nullable=False),
    Column("nodes", JSON, nullable=False),  # the compact range at size
    Column("checkpoint_sha256", String(64), nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
)

audit_entries = Table(
    "audit_entries",
    metadata,
    Column("appliance_id", String(ID), primary_key=True),
    Column("generation", Integer, primary_key=True, autoincrement=False, server_default="1"),
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("leaf_hash", LargeBinary(32), nullable=False),
    Column("raw", LargeBinary, nullable=False),  # the exact canonical bytes
)

audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("appliance_id", String(ID), primary_key=True),
    Column("generation", Integer, primary_key=True, autoincrement=False, server_default="1"),
    Column("size", BigInteger, primary_key=True, autoincrement=False),
    Column("root", String(64), nullable=False),
    Column("checkpoint", Text, nullable=False),
    Column("receipt", Text, nullable=False),
    Column("serial", String(32), nullable=False),
    # Signed by a certificate that had expired (an appliance offline too long):
    # accepted, kept for review.
    Column("signed_after_expiry", Boolean, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
)

# Evidence and escalations are keyed per appliance: ids are chosen by the
# appliances, and one appliance's id must never collide with (or reveal)
# another's.
evidence = Table(
    "evidence",
    metadata,
    Column("appliance_id", String(ID), primary_key=True, index=True),
    Column("bundle_id", String(ID), primary_key=True),
    Column("site_id", String(ID), nullable=False, index=True),
    Column("check_id", String(64), nullable=False),
    Column("result", String(16), nullable=False),
    Column("controls", JSON, nullable=False),
    Column("collected_at", UTCDateTime, nullable=False),
    # The entry recording the bundle: log_index in the appliance's log of
    # generation log_generation.
    Column("log_generation", Integer, nullable=False, server_default="1"),
    Column("log_index", BigInteger, nullable=False),
    Column("payload_sha256", String(64), nullable=False),
    Column("envelope", Text, nullable=False),
    Column("serial", String(32), nullable=False),
    Column("signed_after_expiry", Boolean, nullable=False),
    # Whether the witnessed audit entry at log_index records this bundle;
    # NULL until that entry arrives.
    Column("in_log", Boolean, nullable=True),
    Column("received_at", UTCDateTime, nullable=False),
)

# The newest bundle of each (appliance, check) pair that its witnessed log
# entry does not contradict, as posture reads it: kept at evidence ingest
# (and when a witnessed entry contradicts a bundle), so a partner's posture
# reads a few rows per appliance instead of ranking a million bundles.
# ``reason`` is the signed bundle's ``observed.reason`` (bounded), taken
# once at ingest instead of parsing envelopes on every read.
evidence_heads = Table(
    "evidence_heads",
    metadata,
    Column("appliance_id", String(ID), primary_key=True),
    Column("check_id", String(64), primary_key=True),
    Column("site_id", String(ID), nullable=False, index=True),
    Column("bundle_id", String(ID), nullable=False),
    Column("result", String(16), nullable=False),
    Column("controls", JSON, nullable=False),
    Column("collected_at", UTCDateTime, nullable=False),
    Column("log_generation", Integer, nullable=False),
    Column("log_index", BigInteger, nullable=False),
    Column("signed_after_expiry", Boolean, nullable=False),
    Column("in_log", Boolean, nullable=True),
    Column("reason", Text, nullable=True),
)

escalations = Table(
    "escalations",
    metadata,
    Column("appliance_id", String(ID), primary_key=True),
    Column("escalation_id", String(ID), primary_key=True),
    Column("site_id", String(ID), nullable=False, index=True),
    Column("severity", String(16), nullable=False),
    Column("title", String(200), nullable=False),
    Column("document", JSON, nullable=False),  # the escalation exactly as received
    Column("created_at", UTCDateTime, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Column("acknowledged_at", UTCDateTime, nullable=True),
    Column("acknowledged_by", String(128), nullable=True),  # an actor, as the central log names it
    Column("acknowledged_note", Text, nullable=True),
)

security_alerts = Table(
    "security_alerts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("appliance_id", String(ID), nullable=True, index=True),
    Column("site_id", String(ID), nullable=True, index=True),
    Column("code", String(64), nullable=False),
    Column("detail", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # An alert about the partner's own account (repeated failed sign-ins),
    # not about a site: the partner it concerns.
    Column("partner_id", String(ID), nullable=True, index=True),
)

# One row per generation of an appliance's log after the first: who approved
# the new log, why, and where the old one ended.
audit_log_generations = Table(
    "audit_log_generations",
    metadata,
    Column("appliance_id", String(ID), ForeignKey("appliances.id"), primary_key=True),
    Column("generation", Integer, primary_key=True, autoincrement=False),
    Column("approved_at", UTCDateTime, nullable=False),
    Column("approved_by", String(128), nullable=False),
    Column("reason", Text, nullable=False),
    # The generation it replaced, as witnessed when it was closed.
    Column("previous_size", BigInteger, nullable=False),
    Column("previous_root", String(64), nullable=False),
    Column("central_log_index", BigInteger, nullable=False),
)

config_bundles = Table(
    "config_bundles",
    metadata,
    Column("site_id", String(ID), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("version", BigInteger, primary_key=True, autoincrement=False),
    Column("content_sha256", String(64), nullable=False),
    Column("envelope", Text, nullable=False),
    Column("issued_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
)

# --- the central server's own audit log, and manual evidence

# The central log: the server's own actions (settings, tokens, revocations,
# acknowledgements, manual evidence) as an RFC 6962 Merkle log of the same
# entries as an appliance's, each commit checkpointed by the root key.
# partner_id and site_id say whose action an entry is, so a partner can be
# given proofs of its own entries and never see another's.
central_log_entries = Table(
    "central_log_entries",
    metadata,
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", String(64), nullable=False),
    Column("partner_id", String(ID), nullable=True, index=True),
    Column("site_id", String(ID), nullable=True, index=True),
    Column("leaf_hash", LargeBinary(32), nullable=False),
    Column("raw", LargeBinary, nullable=False),  # the exact canonical bytes
)

# One row (id 1): the log's size, compact range and latest signed checkpoint.
# Writers lock it, so the log grows one commit at a time on every backend.
central_log_head = Table(
    "central_log_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("size", BigInteger, nullable=False),
    Column("nodes", JSON, nullable=False),
    Column("checkpoint", Text, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
)

# A document a partner attached to a control of a site (a policy, a training
# record): its hash is in the central log, so it cannot be swapped later.
manual_evidence = Table(
    "manual_evidence",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("site_id", String(ID), ForeignKey("sites.id"), nullable=False, index=True),
    Column("framework_id", String(32), nullable=False),
    Column("control_id", String(64), nullable=False),
    Column("filename", String(200), nullable=False),
    Column("media_type", String(100), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("note", Text, nullable=False),
    Column("attached_by", String(128), nullable=False),
    Column("attached_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("log_index", BigInteger, nullable=False),
    Column("content", LargeBinary, nullable=False),
)

# --- notifications: channels, events, deliveries

# Where a partner is told: a webhook (signed with its secret, Standard
# Webhooks) or an e-mail address, for the event kinds it chose.
notification_channels = Table(
    "notification_channels",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("partner_id", String(ID), ForeignKey("partners.id"), nullable=False, index=True),
    Column("kind", String(16), nullable=False),  # webhook | email
    Column("url", Text, nullable=True),
    Column("secret", String(128), nullable=True),  # whsec_…; never listed, logged or exported
    Column("email", String(254), nullable=True),
    Column("events", JSON, nullable=False),  # the event kinds it receives
    Column("enabled", Boolean, nullable=False),
    Column("disabled_reason", String(200), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("created_by", String(128), nullable=False),
    # Deleted channels stay for their deliveries' history.
    Column("deleted_at", UTCDateTime, nullable=True),
)

# Something a partner is told about, once: event_key names the occurrence
# (the same offline transition seen by two replicas has one key).
notification_events = Table(
    "notification_events",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("event_key", String(200), nullable=False, unique=True),
    Column("kind", String(32), nullable=False),
    Column("partner_id", String(ID), ForeignKey("partners.id"), nullable=False, index=True),
    Column("site_id", String(ID), nullable=True),
    Column("appliance_id", String(ID), nullable=True),
    Column("payload", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# One event sent to one channel: retried with backoff until delivered or
# given up. lease_until is the claim of the replica sending it now.
notification_deliveries = Table(
    "notification_deliveries",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("event_id", String(ID), ForeignKey("notification_events.id"), nullable=False),
    Column(
        "channel_id", String(ID), ForeignKey("notification_channels.id"), nullable=False, index=True
    ),
    Column("state", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime, nullable=True),
    Column("lease_until", UTCDateTime, nullable=True),
    Column("last_status", Integer, nullable=True),  # the last HTTP status, or SMTP reply code
    Column("last_error", String(500), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("delivered_at", UTCDateTime, nullable=True),
    UniqueConstraint("event_id", "channel_id"),
)

# Appliances declared offline (and told so): the row goes when the
# appliance is back, so each transition is announced once.
appliance_outages = Table(
    "appliance_outages",
    metadata,
    Column("appliance_id", String(ID), ForeignKey("appliances.id"), primary_key=True),
    Column("last_contact_at", UTCDateTime, nullable=False),
    Column("declared_at", UTCDateTime, nullable=False),
)

Index("ix_escalations_open", escalations.c.site_id, escalations.c.acknowledged_at)
# Posture reads the newest bundle of each (appliance, check) of a site; the
# trend and auditor packages read a site's bundles by time.
Index(
    "ix_evidence_newest",
    evidence.c.site_id,
    evidence.c.appliance_id,
    evidence.c.check_id,
    evidence.c.collected_at,
)
Index("ix_evidence_by_time", evidence.c.site_id, evidence.c.collected_at)
# Every column posture ranks a site's bundles on: the newest of each
# (appliance, check) by log position is found in the index alone.
Index(
    "ix_evidence_latest",
    evidence.c.site_id,
    evidence.c.appliance_id,
    evidence.c.check_id,
    evidence.c.log_generation,
    evidence.c.log_index,
    evidence.c.bundle_id,
    evidence.c.in_log,
)
# Paginated lists, newest first.
Index("ix_evidence_received", evidence.c.site_id, evidence.c.received_at)
Index("ix_escalations_received", escalations.c.received_at)
Index(
    "ix_notification_deliveries_due",
    notification_deliveries.c.state,
    notification_deliveries.c.next_attempt_at,
)
Index(
    "ix_notification_deliveries_created",
    notification_deliveries.c.created_at,
    notification_deliveries.c.id,
)


# --- the partner console: people, their invitations, sessions and failed sign-ins

users = Table(
    "users",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("partner_id", String(ID), ForeignKey("partners.id"), nullable=False, index=True),
    # Lower-cased; one account per address across partners (it is the login).
    Column("email", String(254), nullable=False, unique=True),
    # Argon2id, in the PHC string format argon2-cffi writes.
    Column("password_hash", String(256), nullable=False),
    Column("role", String(16), nullable=False),  # admin | editor | viewer
    # TOTP (RFC 6238) base32 secret: pending until a first code confirms it.
    Column("totp_secret", String(64), nullable=True),
    Column("totp_enabled", Boolean, nullable=False),
    # The last time step a code was accepted for: a code is used once.
    Column("totp_last_step", BigInteger, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("removed_at", UTCDateTime, nullable=True),
)

user_invites = Table(
    "user_invites",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("partner_id", String(ID), ForeignKey("partners.id"), nullable=False, index=True),
    Column("email", String(254), nullable=False),
    Column("role", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("used_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
)

user_sessions = Table(
    "user_sessions",
    metadata,
    # SHA-256 of the cookie's 256-bit secret: a stolen table opens nothing.
    Column("id_sha256", String(64), primary_key=True),
    Column("user_id", String(ID), ForeignKey("users.id"), nullable=False, index=True),
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_seen_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),  # absolute expiry
    # Password accepted, TOTP code still to come: such a session opens nothing.
    Column("second_factor_pending", Boolean, nullable=False),
    Column("source", String(64), nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
)

login_failures = Table(
    "login_failures",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("email", String(254), nullable=False),
    Column("source", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_login_failures_email_created_at", "email", "created_at"),
    Index("ix_login_failures_source_created_at", "source", "created_at"),
)
