"""The appliance's figures as a Prometheus textfile for node_exporter.

node_exporter's textfile collector reads every ``*.prom`` file of one
directory at each scrape; the agent rewrites its own file (``metrics_textfile``)
whenever it refreshes its status. The file is replaced atomically (temporary
file, rename: :func:`msp_agent.files.write_atomic`), so a scrape sees the old
figures or the new ones, never half a file; the temporary name does not end
in ``.prom``, so the collector never reads it. Readable by all (0644): the
exporter runs as another user, and the figures are sizes, counts and times,
no identifier nor secret.

The figures are those the heartbeat reports (:class:`Figures`); a time not
known yet (no sync so far, no certificate) is left out rather than written
as 0, which a dashboard would read as 1970.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from msp_agent.files import write_atomic


@dataclass(frozen=True, slots=True)
class Figures:
    """What an operator's dashboard shows of one appliance."""

    version: str
    log_size: int
    witnessed_size: int
    evidence_queued: int
    urgent_waiting: int
    online: bool
    problems: int
    last_sync_at: datetime | None
    certificate_not_after: datetime | None


def render(figures: Figures) -> bytes:
    """The figures in Prometheus' text format, gauges prefixed ``msp_agent_``."""
    registry = CollectorRegistry()

    def gauge(name: str, help_text: str, value: float) -> None:
        Gauge(f"msp_agent_{name}", help_text, registry=registry).set(value)

    Gauge("msp_agent_info", "The running agent's version", ("version",), registry=registry).labels(
        figures.version
    ).set(1)
    gauge("log_size", "Entries in the appliance's audit log", figures.log_size)
    gauge(
        "witnessed_size",
        "Entries of the audit log the central server witnessed (a receipt is held)",
        figures.witnessed_size,
    )
    gauge("evidence_queued", "Evidence bundles waiting for the server", figures.evidence_queued)
    gauge("urgent_waiting", "Urgent incidents not yet delivered", figures.urgent_waiting)
    gauge("link_online", "1 while the central server answers, else 0", int(figures.online))
    gauge("problems", "Problems the agent reports (msp-agent status names them)", figures.problems)
    if figures.last_sync_at is not None:
        gauge(
            "last_sync_timestamp_seconds",
            "When an audit sync last succeeded (Unix time)",
            figures.last_sync_at.timestamp(),
        )
    if figures.certificate_not_after is not None:
        gauge(
            "certificate_not_after_timestamp_seconds",
            "When the delegation certificate expires (Unix time)",
            figures.certificate_not_after.timestamp(),
        )
    return generate_latest(registry)


def write_textfile(path: Path, figures: Figures) -> None:
    """Replace ``path`` with the figures, atomically."""
    write_atomic(path, render(figures), mode=0o644)
