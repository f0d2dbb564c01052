"""The central server's URL in the one form the agent both signs and sends.

The normaliser lives in :mod:`msp_protocol.urls` so that the server's
``public_url`` is normalised by the same code: the URI an appliance signs
and the URI the server rebuilds behind a proxy must agree byte for byte.
This module keeps the agent's imports where they were.
"""

from __future__ import annotations

from msp_protocol.urls import (
    normalize_central_url,
    normalize_percent_encoding,
    remove_dot_segments,
)

__all__ = ["normalize_central_url", "normalize_percent_encoding", "remove_dot_segments"]
