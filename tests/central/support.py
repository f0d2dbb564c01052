"""The central server under test: a real app on loopback, on SQLite or
PostgreSQL, with clients that speak as an admin, a partner or an appliance,
and every response checked against the OpenAPI document."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import jsonschema
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from sqlalchemy.ext.asyncio import AsyncEngine

from msp_central.api_models import SiteOverrides
from msp_central.db.engine import create_engine
from msp_central.openapi import document
from msp_central.queries import create_api_key, create_partner, create_site
from msp_protocol.delegation import DelegationCertificate, Scope, make_delegation_request
from msp_protocol.dsse import Envelope
from msp_protocol.encoding import utc_now
from msp_protocol.evidence import EvidenceBundle, evidence_entry_data, sign_evidence
from msp_protocol.httpsig import sign_request
from msp_protocol.keys import SigningKey
from msp_protocol.log import EntryRecord, genesis_entry, make_checkpoint, make_entry
from msp_protocol.merkle import LeafHashTree, TreeState, consistency_proof
from msp_protocol.sync import SyncRequest
from tests.postgres import configured_url

ROOT = SigningKey(b"\x07" * 32)
# The configured server, for callers outside a test session (the benchmarks);
# tests pass the session's ``postgres_admin_url``, which may be a throw-away one.
PG_ADMIN_URL = configured_url()


async def _as_admin(admin_url: str, *statements: str) -> None:
    admin = create_engine(admin_url)
    try:
        async with admin.connect() as plain:
            connection = await plain.execution_options(isolation_level="AUTOCOMMIT")
            for statement in statements:
                await connection.execute(sa.text(statement))
    finally:
        await admin.dispose()


async def create_pg_database(name: str, admin_url: str = PG_ADMIN_URL) -> str:
    """A new, empty PostgreSQL database (any old one of that name dropped);
    its URL."""
    await _as_admin(
        admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'
    )
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


async def drop_pg_database(name: str, admin_url: str = PG_ADMIN_URL) -> None:
    await _as_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


T = TypeVar("T")


class ThreadLoop:
    """An event loop in a thread of its own, for a server that synchronous
    test code (the browser driver, Schemathesis) talks to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Clock:
    """The server's clock: real time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return utc_now() + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


# --- OpenAPI response validation -----------------------------------------------------


def _operation(method: str, path: str) -> dict[str, Any]:
    doc = document()
    for template, operations in doc["paths"].items():
        parts, actual = (
            template.strip("/").split("/"),
            path.split("?", maxsplit=1)[0].strip("/").split("/"),
        )
        if (
            len(parts) == len(actual)
            and all(p.startswith("{") or p == a for p, a in zip(parts, actual, strict=True))
            and method.lower() in operations
        ):
            return operations[method.lower()]  # type: ignore[no-any-return]
    raise AssertionError(f"{method} {path} is not in the OpenAPI document")


def check_response(method: str, path: str, status: int, content_type: str, body: bytes) -> None:
    """Validate a response against the OpenAPI document (schema by status,
    the problem schema for errors)."""
    operation = _operation(method, path)
    responses = operation["responses"]
    spec = responses.get(str(status)) or responses["default"]
    if status >= 400:
        assert content_type == "application/problem+json", (status, content_type, body[:200])
        # Errors are the default problem; only 429 is listed, for its
        # Retry-After header.
        assert str(status) not in responses or status == 429
    if "content" not in spec:
        assert not body
        return
    ((media, content),) = spec["content"].items()
    if media == "*/*":  # any type: a document as it was attached
        return
    assert content_type == media, (content_type, media)
    schema = {**content["schema"], "components": document()["components"]}
    value = body.decode() if media == "text/plain" else json.loads(body)
    jsonschema.Draft202012Validator(schema).validate(value)


@dataclass
class Reply:
    status: int
    body: Any
    headers: CIMultiDict[str]

    @property
    def code(self) -> str | None:
        return self.body.get("code") if isinstance(self.body, dict) else None


async def call(
    client: TestClient[Any, Any],
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    send = dict(headers or {})
    if body is not None:
        send.setdefault("Content-Type", "application/json")
    # aiohttp warns about large raw bodies; a stream says the same bytes.
    data: Any = io.BytesIO(body) if body is not None and len(body) > 1024 * 1024 else body
    response = await client.request(method, path, data=data, headers=send)
    raw = await response.read()
    check_response(method, path, response.status, response.content_type, raw)
    if response.content_type == "text/plain":
        return Reply(response.status, raw.decode(), CIMultiDict(response.headers))
    if response.status < 300 and response.content_type != "application/json":
        return Reply(response.status, raw, CIMultiDict(response.headers))
    return Reply(response.status, json.loads(raw) if raw else None, CIMultiDict(response.headers))


def dumps(value: Any) -> bytes:
    if isinstance(value, Envelope | SyncRequest):
        return value.canonical_bytes()
    return json.dumps(value).encode()


# --- callers -------------------------------------------------------------------------


@dataclass
class KeyClient:
    """A partner or admin with a bearer key."""

    client: TestClient[Any, Any]
    key: str
    partner_id: str | None = None

    async def request(self, method: str, path: str, value: Any = None) -> Reply:
        body = dumps(value) if value is not None else None
        return await call(
            self.client, method, path, body=body, headers={"Authorization": f"Bearer {self.key}"}
        )


@dataclass
class ApplianceClient:
    """An enrolled appliance: its key, certificate, and its own audit log."""

    client: TestClient[Any, Any]
    clock: Callable[[], datetime]
    key: SigningKey
    appliance_id: str
    site_id: str
    certificate: Envelope
    records: list[EntryRecord] = field(default_factory=list)
    serial: str = ""

    def url(self, path: str) -> str:
        return str(self.client.make_url(path))

    def signed(
        self, method: str, path: str, body: bytes = b"", key: SigningKey | None = None
    ) -> dict[str, str]:
        headers = sign_request(
            key or self.key,
            method,
            self.url(path),
            body=body,
            created=int(self.clock().timestamp()),
        )
        if body:
            headers["Content-Type"] = "application/json"
        return headers

    async def request(
        self, method: str, path: str, value: Any = None, *, key: SigningKey | None = None
    ) -> Reply:
        body = dumps(value) if value is not None else b""
        return await call(
            self.client,
            method,
            path,
            body=body or None,
            headers=self.signed(method, path, body, key),
        )

    # the appliance's audit log

    def grow(
        self, count: int, *, kind: str = "check.run", data: dict[str, Any] | None = None
    ) -> None:
        for _ in range(count):
            index = len(self.records)
            if index == 0:
                record = genesis_entry(
                    appliance_id=self.appliance_id,
                    key_id=self.key.key_id,
                    certificate_serial=self.serial,
                    ts=self.clock(),
                )
            else:
                record = make_entry(
                    index, self.clock(), kind, "agent", data if data is not None else {"n": index}
                )
            self.records.append(record)

    def batch(
        self,
        old: int,
        new: int | None = None,
        *,
        signer: SigningKey | None = None,
        records: list[EntryRecord] | None = None,
    ) -> SyncRequest:
        records = records if records is not None else self.records
        new = len(records) if new is None else new
        leaves = [r.leaf_hash for r in records[:new]]
        state = TreeState()
        state.extend(leaves)
        return SyncRequest.build(
            old_size=old,
            entries=[r.raw for r in records[old:new]],
            consistency=consistency_proof(old, new, LeafHashTree(leaves)) if old else [],
            checkpoint=make_checkpoint(
                signer or self.key, appliance_id=self.appliance_id, state=state, ts=self.clock()
            ),
        )

    def sign_bundle(
        self,
        *,
        key: SigningKey | None = None,
        bundle_id: str | None = None,
        site_id: str | None = None,
        check_id: str = "time_sync",
        controls: dict[str, tuple[str, ...]] | None = None,
        result: str = "pass",
        observed: dict[str, Any] | None = None,
    ) -> Envelope:
        """A signed evidence bundle, recorded as the next entry of the log."""
        index = len(self.records)
        bundle = EvidenceBundle(
            bundle_id=bundle_id or f"ev-{uuid.uuid4().hex}",
            site_id=site_id or self.site_id,
            appliance_id=self.appliance_id,
            check_id=check_id,
            controls=controls or {"hipaa": ("164.312(b)",), "pci_dss": ("10.6.1",)},
            result=result,  # type: ignore[arg-type]
            observed=observed if observed is not None else {"offset_ms": 3},
            collected_at=self.clock(),
            log_index=index,
        )
        envelope = sign_evidence(key or self.key, bundle)
        self.records.append(
            make_entry(
                index, self.clock(), "evidence.signed", "agent", evidence_entry_data(envelope)
            )
        )
        return envelope

    async def push(self, envelope: Envelope) -> Reply:
        """Send one evidence bundle."""
        return await self.request(
            "POST", f"/api/v1/appliances/{self.appliance_id}/evidence", envelope
        )

    async def rotate(self) -> tuple[SigningKey, str]:
        """Ask for a certificate of a new key; return the key and the new serial
        (the appliance keeps using its current key until the caller switches)."""
        new = SigningKey.generate()
        request = make_delegation_request(
            purpose="rotate",
            audience=ROOT.key_id,
            subject=new,
            scopes=(Scope.AUDIT, Scope.EVIDENCE),
            current=(self.serial, self.key),
            created=self.clock(),
        )
        path = f"/api/v1/appliances/{self.appliance_id}/certificates"
        reply = await self.request("POST", path, {"request": request.to_wire()})
        assert reply.status == 201, reply.body
        envelope = Envelope.from_wire(reply.body["certificate"])
        return new, DelegationCertificate.from_json(envelope.payload_bytes()).serial

    async def sync(self, request: SyncRequest, **kwargs: Any) -> Reply:
        return await self.request(
            "POST", f"/api/v1/appliances/{self.appliance_id}/audit/sync", request, **kwargs
        )


@dataclass
class Harness:
    client: TestClient[Any, Any]
    engine: AsyncEngine
    clock: Clock
    root: SigningKey = ROOT
    partners: int = 0  # made by partner() and site(), to name them apart
    sites: int = 0

    async def admin(self) -> KeyClient:
        async with self.engine.begin() as connection:
            key = await create_api_key(connection, "admin", None, self.clock())
        return KeyClient(self.client, key)

    async def partner(self, name: str | None = None) -> KeyClient:
        """A new partner; names must differ, so by default the first is
        "Acme MSP", the next "Acme MSP 2", and so on."""
        self.partners += 1
        if name is None:
            name = "Acme MSP" if self.partners == 1 else f"Acme MSP {self.partners}"
        async with self.engine.begin() as connection:
            row, key = await create_partner(connection, name, self.clock())
        return KeyClient(self.client, key, row.id)

    async def site(self, partner: KeyClient, name: str | None = None) -> str:
        """A new site of ``partner``: "Clinic", then "Clinic 2", ... by default."""
        assert partner.partner_id
        self.sites += 1
        if name is None:
            name = "Clinic" if self.sites == 1 else f"Clinic {self.sites}"
        async with self.engine.begin() as connection:
            row = await create_site(
                connection, partner.partner_id, name, SiteOverrides(), self.clock()
            )
        return str(row.id)

    async def token(self, partner: KeyClient, site_id: str) -> str:
        reply = await partner.request("POST", f"/api/v1/sites/{site_id}/enrollment-tokens", {})
        assert reply.status == 201, reply.body
        return str(reply.body["token"])

    async def enroll_with(
        self,
        token: str,
        *,
        key: SigningKey | None = None,
        scopes: tuple[Scope, ...] = (Scope.AUDIT, Scope.EVIDENCE),
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """POST /api/v1/enroll with ``token`` as the agent sends it (a new
        key unless ``key``); the reply, whatever it is."""
        request = make_delegation_request(
            purpose="enroll",
            audience=self.root.key_id,
            subject=key or SigningKey.generate(),
            scopes=scopes,
            enrollment_token=token,
            created=self.clock(),
        )
        return await call(
            self.client,
            "POST",
            "/api/v1/enroll",
            body=dumps({"token": token, "request": request.to_wire()}),
            headers=headers,
        )

    async def enroll(
        self,
        partner: KeyClient,
        site_id: str | None = None,
        *,
        scopes: tuple[Scope, ...] = (Scope.AUDIT, Scope.EVIDENCE),
        key: SigningKey | None = None,
    ) -> ApplianceClient:
        site_id = site_id or await self.site(partner)
        token = await self.token(partner, site_id)
        key = key or SigningKey.generate()
        reply = await self.enroll_with(token, key=key, scopes=scopes)
        assert reply.status == 201, reply.body
        certificate = Envelope.from_wire(reply.body["certificate"])
        serial = DelegationCertificate.from_json(certificate.payload_bytes()).serial
        return ApplianceClient(
            self.client,
            self.clock,
            key,
            reply.body["appliance_id"],
            site_id,
            certificate,
            serial=serial,
        )


NOW = datetime(2026, 11, 25, tzinfo=UTC)
