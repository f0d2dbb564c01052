"""Agent configuration: a JSON or TOML file, overridden by the environment.

On NixOS the file is generated from ``services.msp-agent.settings``. Every
setting can also be given as ``MSP_AGENT_<NAME>`` (``MSP_AGENT_CENTRAL_URL``),
which wins over the file; command-line values win over both.

Secrets are never settings, only paths to files holding them (systemd
credentials on NixOS): the one-time enrollment token and the Twilio auth
token. The pinned central public key is not a secret.
"""

from __future__ import annotations

import json
import tomllib
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from msp_agent.central_url import normalize_central_url
from msp_protocol.errors import ProtocolError
from msp_protocol.keys import VerifyKey

DEFAULT_STATE_DIR = Path("/var/lib/msp")
# The NixOS module installs a root-owned ``msp-l1@.service`` template whose
# instance name is the action; polkit lets the agent's user start only those.
DEFAULT_L1_COMMAND = ("systemctl", "--no-ask-password", "start", "msp-l1@{action}.service")

_FILE_VALUES: ContextVar[dict[str, Any]] = ContextVar("agent_file_values", default={})  # noqa: B039

E164 = Annotated[str, StringConstraints(pattern=r"^\+[1-9][0-9]{6,14}$")]
Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600)]


class ConfigError(Exception):
    """The configuration file or environment is unusable (one line, for the CLI)."""


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MSP_AGENT_", extra="forbid", frozen=True)

    # The central server (its /api/v1 lives below this URL, normalised as
    # msp_agent.central_url says) and its pinned
    # root public key (hex), which every certificate and bundle must chain to.
    central_url: str | None = None
    central_public_key: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    # A one-time enrollment token (a file): read at the first start, when the
    # appliance has no certificate yet.
    enrollment_token_file: Path | None = None

    # How often each loop runs while nothing wakes it earlier.
    check_interval_seconds: Seconds = 900
    sync_interval_seconds: Seconds = 60
    heartbeat_interval_seconds: Seconds = 300
    bundle_refresh_seconds: Seconds = 3600
    # A request that gets no answer within this long counts as a failure.
    request_timeout_seconds: Seconds = 30

    # The SMS fallback (Twilio): used only when all of these are set.
    twilio_account_sid: str | None = None
    twilio_auth_token_file: Path | None = None
    twilio_from: E164 | None = None
    twilio_api_url: str = "https://api.twilio.com"
    on_call_numbers: list[E164] = []
    # A critical incident that could not reach the server for this long is texted.
    sms_after_seconds: Seconds = 300

    audit_quota_bytes: Annotated[int, Field(gt=0)] | None = None
    evidence_quota_bytes: Annotated[int, Field(gt=0)] | None = None

    # How an allow-listed L1 action is run: argv, with "{action}" replaced by
    # the action's name (never by text from the network).
    l1_command: Annotated[list[str], Field(min_length=1)] = list(DEFAULT_L1_COMMAND)
    # Checks' thresholds and inputs.
    disk_min_free_percent: Annotated[float, Field(ge=0, le=100)] = 10
    sshd_config: Path = Path("/etc/ssh/sshd_config")
    # A certificate is "near expiry" (a failed delegation check) with less than
    # this fraction of its lifetime left.
    certificate_min_remaining: Annotated[float, Field(gt=0, lt=1)] = 0.2
    # Full-tier checks: the journal on disk (the appliance profile's
    # SystemMaxUse is 512 MiB; one file's worth of slack), retained system
    # generations, and the age of the nixpkgs revision the system was built from.
    journal_max_bytes: Annotated[int, Field(gt=0)] = 600 * 1024 * 1024
    max_system_generations: Annotated[int, Field(ge=1)] = 10
    max_os_age_days: Annotated[int, Field(ge=1)] = 30
    # A device key older than this is replaced (rotated) at its next renewal.
    key_rotation_seconds: Annotated[float, Field(gt=0)] = 90 * 24 * 3600

    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    # "json": one JSON object a log line (time, level, logger, message,
    # exception) for a log shipper; "text": the plain lines the journal shows.
    log_format: Literal["text", "json"] = "text"
    # A Prometheus textfile for node_exporter's textfile collector (a path
    # ending in .prom in its directory), rewritten atomically with the
    # status; none by default.
    metrics_textfile: Path | None = None

    @field_validator("central_url")
    @classmethod
    def _central_url(cls, value: str | None) -> str | None:
        # Normalised once, here: the client signs and sends this very string.
        return None if value is None else normalize_central_url(value)

    @field_validator("central_public_key")
    @classmethod
    def _central_key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            VerifyKey.from_hex(value.strip())
        except (ProtocolError, ValueError) as exc:
            raise ValueError(f"not an Ed25519 public key in hex: {exc}") from None
        return value.strip()

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("l1_command")
    @classmethod
    def _l1_command(cls, value: list[str]) -> list[str]:
        if not any("{action}" in part for part in value):
            raise ValueError('must contain "{action}"')
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, InitSettingsSource(settings_cls, _FILE_VALUES.get()))

    # --- derived ---------------------------------------------------------------------------

    @property
    def key_dir(self) -> Path:
        return self.state_dir / "keys"

    def central_key(self) -> VerifyKey:
        if self.central_public_key is None:
            raise ConfigError("central_public_key is not set: the central server's key is pinned")
        return VerifyKey.from_hex(self.central_public_key)

    def require_central_url(self) -> str:
        if self.central_url is None:
            raise ConfigError("central_url is not set")
        return self.central_url

    @property
    def sms_after(self) -> timedelta:
        return timedelta(seconds=self.sms_after_seconds)

    def sms_configured(self) -> bool:
        return bool(
            self.twilio_account_sid
            and self.twilio_auth_token_file
            and self.twilio_from
            and self.on_call_numbers
        )


def load_settings(path: Path | None = None, **overrides: Any) -> AgentSettings:
    """Settings from ``path`` (``.toml``, else JSON), the environment and
    ``overrides`` (command-line values, which win). Raises :class:`ConfigError`."""
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
        return AgentSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        raise ConfigError(f"invalid setting {where}: {error['msg']}") from None
    finally:
        _FILE_VALUES.reset(token)
