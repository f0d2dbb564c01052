"""Local caches of the central server's signed bundles.

- :class:`LocalRunbookCache` — the runbooks this appliance may run;
- :class:`LocalFrameworkCache` — frameworks, controls and their runbook mapping;
- :class:`SiteConfigManager` — the effective configuration of this site.

Each keeps its latest bundle as a file (the DSSE envelope as the server sent
it), written atomically, and verifies it against the pinned central key
*every time it is loaded*, not only when it was fetched: a file edited on disk
is refused. A bundle older than the newest one ever accepted is refused
(rollback); the floor is kept beside the bundle. While offline the cached
bundle is used as it is, and past its expiry it is still used but reported
stale.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from msp_agent.central import CentralClient, CentralRejected, CentralUnavailable
from msp_agent.files import write_atomic
from msp_protocol.bundle import BundleKind, VerifiedBundle, check_bundle
from msp_protocol.dsse import Envelope, parse_envelope
from msp_protocol.encoding import utc_now
from msp_protocol.errors import ProtocolError
from msp_protocol.keys import VerifyKey

log = logging.getLogger(__name__)


class BundleCacheError(Exception):
    """A cached or fetched bundle that must not be used."""


@dataclass(frozen=True, slots=True)
class RefreshOutcome:
    """``updated`` (a newer bundle was stored), ``unchanged``, ``offline`` or
    ``refused`` (the server sent something we will not use)."""

    status: str
    version: int | None
    detail: str = ""


class SignedBundleCache:
    kind: BundleKind

    def __init__(
        self,
        directory: Path,
        *,
        site_id: str,
        central_keys: Sequence[VerifyKey],
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.directory = directory
        self.site_id = site_id
        self._central_keys = list(central_keys)
        self._clock = clock
        self._path = directory / f"{self.kind.value}.bundle.json"
        self._meta_path = directory / f"{self.kind.value}.meta.json"

    # --- reading ---------------------------------------------------------------------------

    def load(self) -> VerifiedBundle | None:
        """The cached bundle, verified now; None if none was ever fetched.

        Raises :class:`BundleCacheError` if the file does not verify (edited,
        signed by another key, for another site) or is older than the newest
        version this appliance has accepted.
        """
        if not self._path.exists():
            return None
        meta = self._meta()
        try:
            envelope = parse_envelope(self._path.read_bytes())
        except ProtocolError as exc:
            raise BundleCacheError(
                f"cached {self.kind.value} bundle is unreadable: {exc}"
            ) from None
        return self._verify(envelope, min_version=int(meta.get("floor", 1)), source="cached")

    def content(self) -> dict[str, Any] | None:
        bundle = self.load()
        return dict(bundle.bundle.content) if bundle else None

    def stale(self) -> bool:
        bundle = self.load()
        return bundle is None or bundle.stale

    # --- refreshing ------------------------------------------------------------------------

    async def refresh(self, client: CentralClient) -> RefreshOutcome:
        """Fetch a newer bundle (with the stored ETag) and store it if it
        verifies and is not older than what is held."""
        try:
            current = self.load()
        except BundleCacheError as exc:
            log.error("%s; fetching a fresh one", exc)
            current = None
        meta = self._meta()
        etag = meta.get("etag") if current is not None else None
        try:
            fetched = await client.fetch_bundle(self.kind, etag)
        except CentralUnavailable as exc:
            return RefreshOutcome("offline", _version(current), str(exc))
        except CentralRejected as exc:
            return RefreshOutcome("refused", _version(current), str(exc))
        if fetched is None:
            return RefreshOutcome("unchanged", _version(current))
        floor = max(int(meta.get("floor", 1)), _version(current) or 1)
        try:
            verified = self._verify(fetched.envelope, min_version=floor, source="fetched")
        except BundleCacheError as exc:
            log.error("%s", exc)
            return RefreshOutcome("refused", _version(current), str(exc))
        if current is not None and verified.bundle.version == current.bundle.version:
            if verified.payload != current.payload:
                detail = (
                    f"{self.kind.value} version {current.bundle.version} "
                    "was re-signed with other content"
                )
                log.error("refusing bundle: %s", detail)
                return RefreshOutcome("refused", current.bundle.version, detail)
            self._write_meta({"etag": fetched.etag, "floor": floor})
            return RefreshOutcome("unchanged", current.bundle.version)
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self._path, fetched.envelope.to_json(), mode=0o600)
        self._write_meta({"etag": fetched.etag, "floor": verified.bundle.version})
        return RefreshOutcome("updated", verified.bundle.version)

    # --- internals -------------------------------------------------------------------------

    def _verify(self, envelope: Envelope, *, min_version: int, source: str) -> VerifiedBundle:
        result = check_bundle(
            envelope,
            roots=self._central_keys,
            kind=self.kind,
            site_id=self.site_id,
            at=self._clock(),
            min_version=min_version,
        )
        if not result.ok:
            raise BundleCacheError(
                f"{source} {self.kind.value} bundle refused: {result.describe()}"
            )
        return result.unwrap()

    def _meta(self) -> dict[str, Any]:
        if not self._meta_path.exists():
            return {}
        try:
            value = json.loads(self._meta_path.read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _write_meta(self, meta: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self._meta_path, json.dumps(meta, sort_keys=True).encode(), mode=0o600)


def _version(bundle: VerifiedBundle | None) -> int | None:
    return bundle.bundle.version if bundle else None


class LocalRunbookCache(SignedBundleCache):
    """The runbooks (allow-listed L1 actions) this appliance may run."""

    kind = BundleKind.RUNBOOKS


class LocalFrameworkCache(SignedBundleCache):
    """Frameworks, their controls, and the control → runbook mapping."""

    kind = BundleKind.FRAMEWORKS


class SiteConfigManager(SignedBundleCache):
    """The effective configuration of this site (frameworks, coverage tier)."""

    kind = BundleKind.SITE_CONFIG
