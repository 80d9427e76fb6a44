"""Shared fixtures: real certificates (trustme), a real WSS CSMS on 127.0.0.1 built with the
``ocpp`` library, and the agent running for real (in this event loop) on the device
simulators (a child process speaking RAPI over a pty and Modbus over TCP).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from agent import app
from agent.config import load
from agent.control import ControlError
from agent.control import request as control_request
from agent.ocpp.csms import Csms
from agent.store import Store

CP_ID = "CP-TEST-1"
PASSWORD = "0123456789abcdef-test"


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(ca: trustme.CA, *hosts: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ca.issue_cert(*(hosts or ("localhost", "127.0.0.1"))).configure_cert(ctx)
    return ctx


@pytest.fixture
async def csms(ca: trustme.CA) -> AsyncIterator[Csms]:
    server = Csms(passwords={CP_ID: PASSWORD})
    await server.start(server_context(ca))
    yield server
    await server.stop()


def write_config(
    directory: Path,
    *,
    url: str,
    ca_file: Path | None,
    password: str = PASSWORD,
    ocpp: dict[str, Any] | None = None,
    extra: str = "",
    csms_extra: str = "",
    time_scale: float = 3600.0,
    connectors: int = 1,
    response_timeout_s: float = 5,
    hardware_extra: str = "",
    agent_extra: str = "",
) -> Path:
    """A config for the agent on simulated hardware against ``url``."""
    ocpp_keys = {"MeterValueSampleInterval": 1, **(ocpp or {})}
    lines = []
    for key, value in ocpp_keys.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = f'"{value}"'
        else:
            text = str(value)
        lines.append(f"{key} = {text}")
    path = directory / "evcp.toml"
    path.write_text(
        f"""
[csms]
url = "{url}"
charge_point_id = "{CP_ID}"
password = "{password}"
ca_file = "{ca_file or ""}"
reconnect_min_s = 0.1
reconnect_max_s = 0.5
response_timeout_s = {response_timeout_s}
{csms_extra}

[agent]
state_dir = "{directory / "state"}"
control_socket = "{directory / "control.sock"}"
log_level = "debug"
{agent_extra}
{"" if "stage_dir" in agent_extra else f'stage_dir = "{directory / "run"}"'}

[time]
ntp_servers = []

[identity]
vendor = "evcp-test"
model = "sim"
serial_number = "SN-1"

[hardware]
driver = "sim"
connectors = {connectors}
meter_poll_s = 0.5
meter_miss_limit = 2
{hardware_extra}

[sim]
time_scale = {time_scale}
{extra}

[ocpp]
{chr(10).join(lines)}
"""
    )
    return path


@dataclass
class RunningAgent:
    """The agent, running ``app.run`` as a task of the test's event loop."""

    config: Path
    task: asyncio.Task[str | None] | None = None
    restarts: list[str] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.config.parent / "control.sock"

    async def start(self) -> RunningAgent:
        cfg = load(self.config)

        async def loop() -> str | None:
            while True:
                kind = await app.run(cfg)
                if kind is None:
                    return None
                self.restarts.append(kind)

        self.task = asyncio.get_running_loop().create_task(loop())
        for _ in range(400):
            if self.task.done():
                self.task.result()
            if self.socket.exists() and await self.running():
                return self
            await asyncio.sleep(0.05)
        raise TimeoutError("agent did not come up (control socket, phase running)")

    async def running(self) -> bool:
        """The agent's control socket answers and its charge point runs (the socket
        answers from the start, while the agent still waits for the clock)."""
        try:
            answer = await self.control({"cmd": "status"})
        except (OSError, ControlError):
            return False
        return answer.get("phase") == "running"

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.task = None

    async def control(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(control_request, self.socket, payload)

    async def status(self) -> dict[str, Any]:
        return await self.control({"cmd": "status"})

    async def sim(self, cmd: str, connector: int = 1, **extra: Any) -> dict[str, Any]:
        answer = await self.control(
            {"cmd": "sim", "request": {"cmd": cmd, "connector": connector, **extra}}
        )
        assert answer.get("ok"), answer
        return answer

    async def swipe(self, tag: str, connector: int | None = None) -> str:
        payload: dict[str, Any] = {"cmd": "swipe", "tag": tag}
        if connector is not None:
            payload["connector"] = connector
        answer = await self.control(payload)
        assert answer.get("ok"), answer
        return str(answer["result"])

    async def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """Poll ``evcp status`` until ``predicate(status)`` holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            status = await self.status()
            if predicate(status):
                return status
            if loop.time() > deadline:
                raise AssertionError(f"status never matched; last: {status}")
            await asyncio.sleep(0.05)


AgentFactory = Callable[..., Any]


@pytest.fixture
async def make_agent(tmp_path: Path, csms: Csms, ca_file: Path) -> AsyncIterator[AgentFactory]:
    """``await make_agent(**write_config_kwargs)`` -> a started RunningAgent."""
    agents: list[RunningAgent] = []

    async def factory(**kwargs: Any) -> RunningAgent:
        kwargs.setdefault("url", f"wss://localhost:{csms.port}/ocpp")
        kwargs.setdefault("ca_file", ca_file)
        directory = tmp_path / f"agent{len(agents)}"
        directory.mkdir()
        agent = RunningAgent(write_config(directory, **kwargs))
        agents.append(agent)
        return await agent.start()

    yield factory
    for agent in agents:
        await agent.stop()


@pytest.fixture
async def booted(make_agent: AgentFactory, csms: Csms) -> RunningAgent:
    """An agent whose BootNotification was accepted and whose connector is Available."""
    agent: RunningAgent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    return agent


def drain(store: Store) -> list[tuple[str, Any]]:
    """Deliver the whole queue, as if every CALL were answered: ``(action, payload's "n")``
    in the order sent."""
    out = []
    while (head := store.queue_head()) is not None:
        out.append((head.action, head.payload.get("n")))
        store.queue_done(head.seq)
    return out


def after_power_cut(state_dir: Path, into: Path) -> list[tuple[str, Any]]:
    """The queue a power cut now would leave -- the state file as it is on disk, the stage
    (RAM) gone -- delivered as :func:`drain` does. (The files are copied: the agent's store
    stays open.)"""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    for f in state_dir.glob("evcp.db*"):
        shutil.copy(f, into / f.name)
    store = Store.open(into)
    try:
        return drain(store)
    finally:
        store.close()


def status_is(connector: int, status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda p: p["connectorId"] == connector and p["status"] == status


#: The errorCode values OCPP 1.6 JSON (section 4.2.3) allows in a CALLERROR.
OCPP16_ERROR_CODES = frozenset(
    {
        "NotImplemented",
        "NotSupported",
        "InternalError",
        "ProtocolError",
        "SecurityError",
        "FormationViolation",
        "PropertyConstraintViolation",
        "OccurenceConstraintViolation",
        "TypeConstraintViolation",
        "GenericError",
    }
)


async def running_tx_id(agent: RunningAgent, connector: int = 1) -> int:
    """The CSMS transaction id running on ``connector`` (waits until there is one)."""
    status = await agent.wait_status(
        lambda s: s["connectors"][connector - 1]["transaction_id"] is not None
    )
    return int(status["connectors"][connector - 1]["transaction_id"])


async def start_charging(agent: RunningAgent, csms: Any, tag: str = "TAG-1") -> int:
    """Plug, RemoteStartTransaction, wait for Charging; return the CSMS transaction id."""
    from ocpp.v16 import call

    mark = len(csms.received)
    await agent.sim("plug")
    result = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag=tag, connector_id=1))
    assert result["status"] == "Accepted"
    await csms.wait_message("StatusNotification", status_is(1, "Charging"), after=mark)
    return await running_tx_id(agent)
