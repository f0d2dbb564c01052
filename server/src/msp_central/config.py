"""Server configuration: a TOML or JSON file, overridden by the environment.

Every setting can be given as ``MSP_CENTRAL_<NAME>`` (for example
``MSP_CENTRAL_DATABASE_URL``). Secrets are never settings themselves, only
paths to files holding them: the central root key (``root_key_file``) and,
for PostgreSQL with a password, the database URL (``database_url_file``).
"""

from __future__ import annotations

import json
import tomllib
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from msp_protocol.limits import DEFAULT_LIMITS
from msp_protocol.urls import normalize_central_url

# The settings file's values while load_settings builds Settings.
_FILE_VALUES: ContextVar[dict[str, Any]] = ContextVar("file_values", default={})  # noqa: B039


class ConfigError(Exception):
    """The configuration file or environment is unusable (one line, for the CLI)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MSP_CENTRAL_", extra="forbid", frozen=True)

    # Where the embedded SQLite database and the default key file live.
    state_dir: Path = Path("/var/lib/msp-central")
    # SQLAlchemy URL; default: SQLite in state_dir. PostgreSQL:
    # postgresql+asyncpg://user@host/db. A URL holding a password belongs in
    # database_url_file instead.
    database_url: str | None = None
    database_url_file: Path | None = None
    # The central root key (Ed25519 seed, hex). Default: state_dir/keys/root.key.
    root_key_file: Path | None = None

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # The URL appliances use to reach this server, when it sits behind a
    # reverse proxy: RFC 9421 signatures cover the full target URI, which must
    # be rebuilt as the appliance saw it. Normalised at load as the agent
    # normalises central_url (msp_protocol.urls).
    public_url: str | None = None
    # Run pending database migrations when serving starts.
    migrate_on_start: bool = False

    # A fraction of a day is allowed (a lab, a test of renewal and expiry).
    certificate_lifetime_days: Annotated[float, Field(gt=0, le=90)] = 30
    bundle_lifetime_hours: Annotated[int, Field(ge=1, le=24 * 90)] = 24 * 7
    enrollment_token_hours: Annotated[int, Field(ge=1, le=24 * 30)] = 72
    # Request bodies: the audit sync endpoint may take a full batch; every
    # other endpoint far less.
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    max_sync_body_bytes: Annotated[int, Field(ge=1024)] = DEFAULT_LIMITS.max_json_bytes
    # A document attached as manual evidence (sent base64 in JSON, stored in
    # the database so replicas share it).
    max_document_bytes: Annotated[int, Field(ge=1024, le=100 * 1024 * 1024)] = 10 * 1024 * 1024

    # Liveness: an appliance is offline once it has missed this many of its
    # own heartbeats; an agent that does not say its interval is taken to
    # beat this often.
    offline_after_heartbeats: Annotated[int, Field(ge=1, le=100)] = 3
    default_heartbeat_interval_seconds: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] = 300

    # Notifications: how often the notifier looks for offline appliances and
    # due deliveries; how a failed delivery is retried (exponential backoff
    # with jitter from retry_base up to retry_max, then given up).
    notify_interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 5
    notification_max_attempts: Annotated[int, Field(ge=1, le=50)] = 10
    notification_retry_base_seconds: Annotated[float, Field(gt=0, le=24 * 3600)] = 30
    notification_retry_max_seconds: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] = 6 * 3600
    # One webhook POST or one SMTP conversation, start to end.
    notification_timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10

    # E-mail notifications go through this SMTP server; without smtp_host
    # e-mail channels are refused. The password lives in a file.
    smtp_host: str | None = None
    smtp_port: Annotated[int, Field(ge=1, le=65535)] = 587
    smtp_from: str | None = None
    smtp_username: str | None = None
    smtp_password_file: Path | None = None
    smtp_starttls: bool = True

    # The partner console: a session ends after this long without a request,
    # and in any case this long after sign-in; an invitation link lapses.
    console_idle_minutes: Annotated[int, Field(ge=1, le=24 * 60)] = 30
    console_session_hours: Annotated[int, Field(ge=1, le=24 * 30)] = 12
    console_invite_hours: Annotated[int, Field(ge=1, le=24 * 30)] = 72
    # Failed sign-ins: one address from one source is refused (429) after
    # this many within the window; any one source after
    # login_source_failures; an account with login_alert_failures failures
    # (from anywhere) raises a security alert for its partner.
    login_window_minutes: Annotated[int, Field(ge=1, le=24 * 60)] = 15
    login_account_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    login_source_failures: Annotated[int, Field(ge=1, le=100000)] = 50
    login_alert_failures: Annotated[int, Field(ge=1, le=100000)] = 10
    # Failed API keys, enrollment tokens and request signatures, counted per
    # source address (an IPv6 address by its /64) and per server process
    # within a fixed window: one credential from one source is refused (429)
    # after credential_identity_failures; past credential_source_failures
    # from the source, a failing credential gets 429 instead of 401 (valid
    # ones are still served: neighbours behind one NAT address keep
    # working); credential_alert_failures raise one security alert per
    # source, kind and window. credential_source_flood (off unless set):
    # past it every credential of that kind from the source is refused,
    # valid ones too, which locks out the neighbours behind one NAT address.
    credential_window_minutes: Annotated[int, Field(ge=1, le=24 * 60)] = 15
    credential_identity_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    credential_source_failures: Annotated[int, Field(ge=1, le=1_000_000)] = 50
    credential_source_flood: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    credential_alert_failures: Annotated[int, Field(ge=1, le=1_000_000)] = 20
    # Reverse proxies whose X-Forwarded-For names the real client (the last
    # address it added). Requests from anyone else are taken at their address.
    trusted_proxies: list[str] = []

    # Request bodies above large_body_bytes (or chunked, of unknown length)
    # are handled at most max_large_bodies at a time per server process; one
    # that finds no slot within large_body_wait_seconds is answered 503 with
    # Retry-After. Each holds a body up to its route's limit (an audit batch:
    # max_sync_body_bytes) while it is checked.
    large_body_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024
    max_large_bodies: Annotated[int, Field(ge=1, le=1024)] = 8
    large_body_wait_seconds: Annotated[float, Field(gt=0, le=60)] = 2

    # Observability. /metrics (Prometheus text format) is served to nobody
    # ("off": 404 as for an unknown route), to loopback peers whose request
    # came through no proxy ("loopback"), or to callers presenting the token
    # held in metrics_token_file ("bearer", read at start). log_format
    # "json" writes one JSON object per log line (time, level, logger,
    # message, exception) for a log shipper; credentials are redacted alike.
    metrics_access: Literal["off", "loopback", "bearer"] = "off"
    metrics_token_file: Path | None = None
    log_format: Literal["text", "json"] = "text"

    # Admission control per server process (msp_central.admission): at most
    # this many requests of each lane are handled at once (bulk: audit sync
    # and evidence uploads; urgent: heartbeats, escalations, enrollment,
    # certificates, bundles, revocations; interactive: the partner API and
    # the console); a request that finds no slot within
    # admission_wait_seconds (0: none at all) is answered 503 server-busy
    # with Retry-After before its body is read. Bulk work is mostly CPU
    # (hashing and verifying batches) on one event loop: more bulk slots
    # than a few per core drain no faster and make heartbeats wait.
    admission_bulk_limit: Annotated[int, Field(ge=1, le=10_000)] = 8
    admission_urgent_limit: Annotated[int, Field(ge=1, le=10_000)] = 64
    admission_interactive_limit: Annotated[int, Field(ge=1, le=10_000)] = 32
    admission_wait_seconds: Annotated[float, Field(ge=0, le=60)] = 1
    # The database connection pool of each server process: pool_size kept
    # open, max_overflow more under load; a request that waits
    # database_pool_timeout_seconds for a connection is answered 503
    # server-busy. Size it so that replicas x (pool_size + max_overflow)
    # stays below PostgreSQL's max_connections.
    database_pool_size: Annotated[int, Field(ge=1, le=1000)] = 10
    database_max_overflow: Annotated[int, Field(ge=0, le=1000)] = 10
    database_pool_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 3
    # On SIGTERM the health check answers 503 shutting-down for this long
    # while everything else is still served, so a load balancer takes the
    # replica out of rotation first; behind a balancer, set it to the
    # check interval times the failures it needs (0: stop at once).
    shutdown_drain_seconds: Annotated[float, Field(ge=0, le=300)] = 0

    @model_validator(mode="after")
    def _flood_above_failures(self) -> Settings:
        # A flood limit below the failure limit would refuse valid
        # credentials before failing ones are ever answered 429.
        flood = self.credential_source_flood
        if flood is not None and flood < self.credential_source_failures:
            raise ValueError("credential_source_flood must be at least credential_source_failures")
        return self

    @model_validator(mode="after")
    def _bearer_has_a_token(self) -> Settings:
        if self.metrics_access == "bearer" and self.metrics_token_file is None:
            raise ValueError('metrics_access "bearer" needs metrics_token_file')
        return self

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        # Normalised once, here, by the function that normalises the agent's
        # central_url: the target URI rebuilt behind a proxy starts with this
        # string and must match what the appliance signed byte for byte.
        if value is None or not value.strip():
            return None
        return normalize_central_url(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The command line (init values) wins over the environment, which
        # wins over the file, so an operator can override one value of a
        # generated file.
        return (init_settings, env_settings, InitSettingsSource(settings_cls, _FILE_VALUES.get()))

    @property
    def certificate_lifetime(self) -> timedelta:
        return timedelta(days=self.certificate_lifetime_days)

    @property
    def bundle_lifetime(self) -> timedelta:
        return timedelta(hours=self.bundle_lifetime_hours)

    @property
    def enrollment_token_lifetime(self) -> timedelta:
        return timedelta(hours=self.enrollment_token_hours)

    @property
    def smtp_configured(self) -> bool:
        return bool(self.smtp_host and self.smtp_from)

    def smtp_password(self) -> str | None:
        """The SMTP password from ``smtp_password_file`` (None without one)."""
        if self.smtp_password_file is None:
            return None
        try:
            return self.smtp_password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read smtp_password_file {self.smtp_password_file}: {exc.strerror}"
            ) from None

    def metrics_token(self) -> str:
        """The bearer token of /metrics from ``metrics_token_file``."""
        if self.metrics_token_file is None:
            raise ConfigError("metrics_token_file is not set")
        try:
            token = self.metrics_token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read metrics_token_file {self.metrics_token_file}: {exc.strerror}"
            ) from None
        if len(token) < 16:
            raise ConfigError(f"metrics_token_file {self.metrics_token_file}: token too short")
        return token

    @property
    def key_file(self) -> Path:
        return self.root_key_file or self.state_dir / "keys" / "root.key"

    def resolved_database_url(self) -> str:
        if self.database_url_file is not None:
            try:
                return self.database_url_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read database_url_file {self.database_url_file}: {exc.strerror}"
                ) from None
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.state_dir / 'central.db'}"


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``path`` (``.toml`` or ``.json``), the environment and
    ``overrides`` (command-line values, which win over the file)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"config file {path} does not parse: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold an object of settings")
    token = _FILE_VALUES.set(values)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        raise ConfigError(f"invalid setting {where}: {error['msg']}") from None
    finally:
        _FILE_VALUES.reset(token)
