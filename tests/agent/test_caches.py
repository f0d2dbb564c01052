"""Signed bundle caches: verified on every load, atomic, no rollback, usable offline."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from msp_agent.caches import (
    BundleCacheError,
    LocalFrameworkCache,
    LocalRunbookCache,
    SiteConfigManager,
)
from msp_protocol.bundle import BundleKind, ConfigBundle, sign_bundle
from msp_protocol.keys import SigningKey
from tests.agent.fakes import FakeCentral
from tests.agent.support import CENTRAL, NOW, SITE, Clock


def bundle(
    version: int, kind: str = "runbooks", site: str = SITE, days: int = 7, **content: object
) -> ConfigBundle:
    return ConfigBundle.model_validate(
        {
            "kind": kind,
            "site_id": site,
            "version": version,
            "issued_at": NOW,
            "expires_at": NOW + timedelta(days=days),
            "content": content or {"runbooks": [{"id": "ntp-sync", "action": "restart-timesyncd"}]},
        }
    )


def publish(
    central: FakeCentral, version: int, signer: SigningKey = CENTRAL, **kwargs: object
) -> None:
    item = bundle(version, **kwargs)  # type: ignore[arg-type]
    central.bundles[BundleKind(item.kind)] = (sign_bundle(signer, item), f'"v{version}"')


def cache(tmp_path: Path, clock: Clock | None = None) -> LocalRunbookCache:
    return LocalRunbookCache(
        tmp_path / "cache", site_id=SITE, central_keys=[CENTRAL.verify_key], clock=clock or Clock()
    )


async def test_fetch_store_and_reload(tmp_path: Path) -> None:
    central = FakeCentral(CENTRAL)
    publish(central, 3)
    runbooks = cache(tmp_path)
    assert runbooks.load() is None
    assert (await runbooks.refresh(central)).status == "updated"
    assert runbooks.content() == {"runbooks": [{"id": "ntp-sync", "action": "restart-timesyncd"}]}
    assert cache(tmp_path).load() is not None, "a new process finds it"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "runbooks.bundle.json",
        "runbooks.meta.json",
    ]


async def test_etag_makes_an_unchanged_bundle_cheap(tmp_path: Path) -> None:
    central = FakeCentral(CENTRAL)
    publish(central, 3)
    runbooks = cache(tmp_path)
    await runbooks.refresh(central)
    assert (await runbooks.refresh(central)).status == "unchanged"
    publish(central, 4)
    assert (await runbooks.refresh(central)).version == 4


async def test_offline_keeps_using_the_cached_bundle_and_marks_it_stale_after_expiry(
    tmp_path: Path,
) -> None:
    clock, central = Clock(), FakeCentral(CENTRAL)
    publish(central, 3)
    runbooks = cache(tmp_path, clock)
    await runbooks.refresh(central)
    central.down = True
    assert (await runbooks.refresh(central)).status == "offline"
    assert not runbooks.stale()
    clock.advance(timedelta(days=8))
    assert runbooks.stale()
    assert runbooks.content() is not None, "stale, but still used"


@pytest.mark.parametrize(
    ("publish_kwargs", "message"),
    [
        pytest.param({"signer": SigningKey(b"\x09" * 32)}, "bad-signature", id="wrong_key"),
        pytest.param({"site": "site-other"}, "wrong-subject", id="other_site"),
        pytest.param({"kind": "frameworks"}, "verification-failed", id="other_kind"),
    ],
)
async def test_fetched_bundles_that_do_not_verify_are_refused(
    tmp_path: Path, publish_kwargs: dict[str, object], message: str
) -> None:
    central = FakeCentral(CENTRAL)
    publish(central, 5, **publish_kwargs)  # type: ignore[arg-type]
    if publish_kwargs.get("kind") == "frameworks":
        central.bundles[BundleKind.RUNBOOKS] = central.bundles.pop(BundleKind.FRAMEWORKS)
    runbooks = cache(tmp_path)
    outcome = await runbooks.refresh(central)
    assert outcome.status == "refused"
    assert message in outcome.detail
    assert runbooks.load() is None


async def test_lower_version_is_refused(tmp_path: Path) -> None:
    central = FakeCentral(CENTRAL)
    publish(central, 5)
    runbooks = cache(tmp_path)
    await runbooks.refresh(central)
    publish(central, 4)
    outcome = await runbooks.refresh(central)
    assert outcome.status == "refused"
    assert "rollback" in outcome.detail
    loaded = runbooks.load()
    assert loaded is not None
    assert loaded.bundle.version == 5


async def test_same_version_with_other_content_is_refused(tmp_path: Path) -> None:
    central = FakeCentral(CENTRAL)
    publish(central, 5)
    runbooks = cache(tmp_path)
    await runbooks.refresh(central)
    publish(central, 5, runbooks=[{"id": "evil", "action": "rm"}])
    central.bundles[BundleKind.RUNBOOKS] = (central.bundles[BundleKind.RUNBOOKS][0], '"other"')
    assert (await runbooks.refresh(central)).status == "refused"


async def test_file_edited_on_disk_is_refused_at_load(tmp_path: Path) -> None:
    central = FakeCentral(CENTRAL)
    publish(central, 5)
    runbooks = cache(tmp_path)
    await runbooks.refresh(central)
    path = tmp_path / "cache" / "runbooks.bundle.json"
    path.write_bytes(path.read_bytes().replace(b'"payload":"', b'"payload":"AAAA'))
    with pytest.raises(BundleCacheError, match="cached runbooks bundle"):
        runbooks.load()


async def test_older_signed_file_put_back_on_disk_is_a_rollback(tmp_path: Path) -> None:
    central = FakeCentral(CENTRAL)
    publish(central, 5)
    runbooks = cache(tmp_path)
    await runbooks.refresh(central)
    old = (tmp_path / "cache" / "runbooks.bundle.json").read_bytes()
    publish(central, 6)
    await runbooks.refresh(central)
    (tmp_path / "cache" / "runbooks.bundle.json").write_bytes(old)
    with pytest.raises(BundleCacheError, match="rollback"):
        runbooks.load()
    # The next refresh repairs it.
    assert (await runbooks.refresh(central)).status == "updated"
    loaded = runbooks.load()
    assert loaded is not None
    assert loaded.bundle.version == 6


async def test_each_kind_has_its_own_cache(tmp_path: Path) -> None:
    central = FakeCentral(CENTRAL)
    publish(central, 1, kind="frameworks", frameworks={"hipaa": {"controls": ["164.312(b)"]}})
    publish(central, 2, kind="site-config", frameworks=["hipaa"], tier="full")
    frameworks = LocalFrameworkCache(
        tmp_path / "cache", site_id=SITE, central_keys=[CENTRAL.verify_key], clock=Clock()
    )
    site = SiteConfigManager(
        tmp_path / "cache", site_id=SITE, central_keys=[CENTRAL.verify_key], clock=Clock()
    )
    assert (await frameworks.refresh(central)).version == 1
    assert (await site.refresh(central)).version == 2
    assert site.content() == {"frameworks": ["hipaa"], "tier": "full"}
