"""A throwaway RabbitMQ node (scripts/rabbitmq-node) for the recovery case: ours to restart."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODE_SCRIPT = ROOT / "scripts" / "rabbitmq-node"
SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


class NodeError(RuntimeError):
    """The node could not be started, or rabbitmqctl failed on it."""


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def node_port() -> int:
    """An AMQP port whose management (+10000) and distribution (+20000) ports are free too;
    from 6100 up, apart from the fault suite's range (5700 up)."""
    start = 6100 + os.getpid() % 200
    for port in range(start, start + 400):
        if all(_port_free(p) for p in (port, port + 10000, port + 20000)):
            return port
    raise NodeError("no free port triple (P, P+10000, P+20000) from 6100 up")


def why_no_node() -> str | None:
    """Why this machine cannot run a throwaway node, or None when it can."""
    if not SERVER.exists():
        return "rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)"
    if os.geteuid() != 0 and os.environ.get("USER") != "rabbitmq":
        return "starting a throwaway RabbitMQ node needs root or the rabbitmq user"
    return None


@dataclass
class NodeAddress:
    """NAME@localhost, AMQP on `port`, management on port + 10000."""

    name: str
    port: int

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def management_url(self) -> str:
        return f"http://guest:guest@127.0.0.1:{self.port + 10000}/"


def start_node(address: NodeAddress) -> None:
    """Start the node with scripts/rabbitmq-node (blocking until it answers)."""
    result = subprocess.run([str(NODE_SCRIPT), "start", address.name, str(address.port)],
                            capture_output=True, text=True, timeout=180, check=False)
    if result.returncode != 0:
        raise NodeError(f"scripts/rabbitmq-node start {address.name} {address.port} failed "
                        f"(exit {result.returncode}):\n{result.stderr}{result.stdout}")


def destroy_node(address: NodeAddress) -> None:
    """Stop the node and delete its folder (whatever state it is in)."""
    subprocess.run([str(NODE_SCRIPT), "stop", address.name], capture_output=True, text=True,
                   timeout=180, check=False)


def rabbitmqctl(address: NodeAddress, *args: str, timeout: float = 120) -> str:
    result = subprocess.run(["rabbitmqctl", "-q", "-n", address.node, *args],
                            capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise NodeError(f"rabbitmqctl -n {address.node} {' '.join(args)} failed "
                        f"(exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout


@dataclass
class Node(NodeAddress):
    """The benchmark's throwaway node, driven from its event loop."""

    async def start(self) -> None:
        await asyncio.to_thread(start_node, self)

    async def destroy(self) -> None:
        await asyncio.to_thread(destroy_node, self)

    async def ctl(self, *args: str, timeout: float = 120) -> str:
        return await asyncio.to_thread(rabbitmqctl, self, *args, timeout=timeout)
