"""The server's ``public_url`` is held in the normal form the agent gives
its ``central_url`` (msp_protocol.urls), so the URI it rebuilds behind a
proxy is the URI the appliance signed; what cannot be a URL is refused at
load in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from msp_central.config import ConfigError, load_settings


@pytest.mark.parametrize(
    ("spelt", "normal"),
    [
        ("https://central.example.com", "https://central.example.com"),
        ("https://central.example.com/", "https://central.example.com"),
        ("HTTPS://Central.Example.COM:443/msp/./", "https://central.example.com/msp"),
        ("http://central.example.com:8443//", "http://central.example.com:8443"),
        ("https://h.example/%7emsp/a/../b", "https://h.example/~msp/b"),
        ("https://Bücher.Example", "https://xn--bcher-kva.example"),
        ("", None),
    ],
)
def test_public_url_is_normalised_at_load(tmp_path: Path, spelt: str, normal: str | None) -> None:
    config = tmp_path / "central.json"
    config.write_text(json.dumps({"public_url": spelt}))
    assert load_settings(config).public_url == normal


@pytest.mark.parametrize(
    ("spelt", "reason"),
    [
        ("central.example.com", "must be an http:// or https:// URL"),
        ("https://central.example.com/?x=1", "must not carry a query or a fragment"),
        ("https://admin:pw@central.example.com", "must not carry credentials"),
        ("https://central.example.com:99999", "bad port"),
    ],
)
def test_a_bad_public_url_is_one_line(tmp_path: Path, spelt: str, reason: str) -> None:
    config = tmp_path / "central.json"
    config.write_text(json.dumps({"public_url": spelt}))
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    message = str(refused.value)
    assert message.startswith("invalid setting public_url:")
    assert reason in message
    assert "\n" not in message
    assert "pw" not in message
