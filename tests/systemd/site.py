"""A client site as the systemd tests build it: a ``central`` container
running the unit ``nixos/central.nix`` renders (SQLite), and ``appliance``
containers running what ``nixos/agent.nix`` renders, joined by a
:class:`~tests.systemd.machines.Link`.

The steps are the NixOS VM tests' (tests/nixos/common.nix): the central
server's CLI through the module's ``msp-central-manage`` (same user,
configuration and credentials as the service), a partner with the
healthcare preset and a site, a token per appliance. What the system tests
read from disk (``tests/system/harness.py``: the server's database, the
agent's ``status.json`` and audit log) is read here through the same
classes, pointed at the containers' files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from msp_protocol.keys import SigningKey
from tests.system.harness import Agent, Central
from tests.systemd import units
from tests.systemd.machines import Container, Link, until

CENTRAL_PORT = 8080

# Minutes become seconds so a scenario fits in a test run (as common.nix).
AGENT_SETTINGS: Mapping[str, Any] = {
    "check_interval_seconds": 15,
    "sync_interval_seconds": 5,
    "heartbeat_interval_seconds": 10,
    "bundle_refresh_seconds": 10,
    "request_timeout_seconds": 5,
}

_API = """
import json, sys, urllib.error, urllib.request
method, url, key, body = sys.argv[1:5]
request = urllib.request.Request(url, method=method, data=body.encode() or None,
    headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=10) as response:
        print(json.dumps({"status": response.status, "body": response.read().decode()}))
except urllib.error.HTTPError as error:
    print(json.dumps({"status": error.code, "body": error.read().decode()}))
"""


class ContainerCentral(Central):
    """tests/system's Central, reading the central container's database."""

    def __init__(self, container: Container, scratch: Path, public_key: str) -> None:
        super().__init__(scratch)
        self.container = container
        self.public_key = public_key

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{CENTRAL_PORT}"

    @property
    def database(self) -> Path:
        return self.container.path("/var/lib/msp-central/central.db")

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        answer = self.container.json(
            "/opt/msp/bin/python3",
            "-c",
            _API,
            method,
            self.url + path,
            self.partner_key,
            "" if body is None else json.dumps(body),
        )
        text = answer["body"]
        return int(answer["status"]), json.loads(text) if text else None

    def api(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.request(method, path, body)
        assert 200 <= status < 300, f"{method} {path}: HTTP {status} {answer}"
        return answer

    def manage(self, *argv: str) -> dict[str, Any]:
        """``msp-central-manage`` as root in the container, its JSON answer."""
        return dict(self.container.json("msp-central-manage", *argv))

    def token(self) -> str:
        return str(self.manage("token", "create", "--site", self.site_id)["token"])

    def wait_ready(self, *, within: float = 60) -> None:
        self.container.wait_for_unit("msp-central.service", within=within)

        def listening() -> bool:
            out = self.container.run("ss", "-Hltn", f"sport = :{CENTRAL_PORT}").stdout
            return bool(out.strip())

        until(listening, within=within, what="the central server's port")


class ContainerAgent(Agent):
    """tests/system's Agent, reading the appliance container's state."""

    def __init__(self, container: Container, central: Central, scratch: Path) -> None:
        super().__init__(scratch, central, f"http://{Link.CENTRAL_ADDRESS}:{CENTRAL_PORT}")
        self.container = container
        self.token: str | None = None

    @property
    def state_dir(self) -> Path:
        return self.container.path("/var/lib/msp")

    def wait(
        self, predicate: Callable[[dict[str, Any]], Any], what: str, *, within: float = 120
    ) -> dict[str, Any]:
        """Wait until ``status.json`` satisfies ``predicate`` while the unit runs."""

        def check() -> dict[str, Any] | None:
            state = self.container.systemctl("is-active", "msp-agent.service", check=False)
            if state.stdout.strip() == "failed":
                raise AssertionError(
                    "msp-agent.service failed:\n"
                    + self.container.journal("msp-agent.service")[-3000:]
                )
            status = self.status()
            return status if status and predicate(status) else None

        return until(check, within=within, what=f"agent: {what}")

    def cli_status(self) -> dict[str, Any]:
        """``msp-agent status --json``, the operator's command, as the agent's user."""
        return dict(
            self.container.json("runuser", "-u", "msp", "--", "msp-agent", "status", "--json")
        )


class Site:
    """The central container, set up, and the link appliances join."""

    def __init__(self, image: Path, scratch: Path) -> None:
        self.image = image
        self.scratch = scratch
        self.link = Link()
        self.containers: list[Container] = []
        seed = SigningKey.generate()
        self.public_key = seed.verify_key.hex
        self.central_url = f"http://{Link.CENTRAL_ADDRESS}:{CENTRAL_PORT}"
        try:
            container = self._container("central")
            self.central_render = units.install_central(
                container.root,
                root_key_seed_hex=seed.seed_bytes().hex(),
                port=CENTRAL_PORT,
                extra_settings={"public_url": self.central_url},
            )
            container.boot()
            self.central = ContainerCentral(container, scratch / "central", self.public_key)
            self.central.wait_ready()
            shown = self.central.manage("keys", "show")
            assert shown["public_key"] == self.public_key, "the server runs with the installed key"
            partner = self.central.manage("partner", "create", "systemd test MSP")
            self.central.partner_key = partner["api_key"]
            self.partner_id = partner["partner_id"]
            self.central.api("POST", "/api/v1/partner/apply-preset", {"preset": "healthcare"})
            self.new_client_site("systemd test clinic")
        except BaseException:
            self.close()
            raise

    def new_client_site(self, name: str) -> str:
        """A new site of the partner; tokens are made for it from now on."""
        site = self.central.manage("site", "create", "--partner", self.partner_id, name)
        self.central.site_id = str(site["site_id"])
        return self.central.site_id

    def _container(self, name: str) -> Container:
        side = "central" if name == "central" else "appliance"
        container = Container(name, self.image, self.link.path(side))
        self.containers.append(container)
        return container

    def appliance(
        self,
        *,
        token: str | None,
        settings: Mapping[str, Any] | None = None,
        boot: bool = True,
        degraded: bool = False,
    ) -> ContainerAgent:
        """A new appliance container with services.msp-agent, booted."""
        assert not any(c.name == "appliance" and c.leader for c in self.containers), (
            "one appliance at a time: they share the link's address"
        )
        container = self._container("appliance")
        units.install_appliance(
            container.root,
            central_url=self.central_url,
            central_public_key=self.public_key,
            enrollment_token=token,
            extra_settings={**AGENT_SETTINGS, **dict(settings or {})},
        )
        if boot:
            container.boot(degraded=degraded)
        agent = ContainerAgent(
            container, self.central, self.scratch / f"agent-{len(self.containers)}"
        )
        agent.token = token
        return agent

    def switch(self, agent: ContainerAgent, settings: Mapping[str, Any]) -> None:
        """What ``nixos-rebuild switch`` does for a settings change: the
        modules rendered again with ``settings``, installed, systemd
        reloaded, the agent restarted."""
        units.install_appliance(
            agent.container.root,
            central_url=self.central_url,
            central_public_key=self.public_key,
            enrollment_token=agent.token,
            extra_settings={**AGENT_SETTINGS, **dict(settings)},
        )
        agent.container.systemctl("daemon-reload")
        agent.container.systemctl("restart", "msp-agent.service")

    def retire(self, agent: ContainerAgent) -> None:
        agent.container.close()
        self.containers.remove(agent.container)

    def close(self) -> None:
        for container in reversed(self.containers):
            container.close()
        self.containers.clear()
        self.link.close()
