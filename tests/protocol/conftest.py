"""Fixtures for the protocol tests: fixed keys and a fixed clock, so every
failure is reproducible."""

from __future__ import annotations

import pytest

from msp_protocol.delegation import Scope, VerifiedDelegation, issue_delegation, verify_delegation
from msp_protocol.keys import SigningKey
from tests.protocol.support import APPLIANCE, NOW, SITE, key


@pytest.fixture
def root() -> SigningKey:
    return key(1)


@pytest.fixture
def device() -> SigningKey:
    return key(2)


@pytest.fixture
def delegation(root: SigningKey, device: SigningKey) -> VerifiedDelegation:
    envelope = issue_delegation(
        root,
        subject=device.verify_key,
        appliance_id=APPLIANCE,
        site_id=SITE,
        scopes=[Scope.AUDIT, Scope.EVIDENCE],
        not_before=NOW,
    )
    return verify_delegation(envelope, roots=[root.verify_key], at=NOW)
