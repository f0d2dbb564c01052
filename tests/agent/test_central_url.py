"""The agent's ``central_url`` setting is held in the normal form of
:mod:`msp_protocol.urls` (the normaliser's own tests:
tests/protocol/test_urls.py), and what cannot be a URL is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from msp_agent import central_url
from msp_agent.config import ConfigError, load_settings
from msp_protocol import urls


def test_the_agent_uses_the_shared_normaliser() -> None:
    assert central_url.normalize_central_url is urls.normalize_central_url


def test_a_bad_central_url_in_the_settings_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"central_url": "https://central.example.com/?site=1"}))
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    message = str(refused.value)
    assert message.startswith("invalid setting central_url:")
    assert "must not carry a query or a fragment" in message
    assert "\n" not in message


def test_settings_hold_the_normal_form(tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"central_url": "HTTPS://Central.Example.com:443/./msp/"}))
    assert load_settings(config).central_url == "https://central.example.com/msp"
