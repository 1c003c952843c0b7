"""CPU time and memory of processes from /proc, and which process is the broker."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK")
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", ""}  # noqa: S104 - matched, not bound


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds the process has used so far (None: it is gone)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2:].split()
    # utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int | None:
    """Resident memory (VmRSS) of the process in bytes (None: it is gone)."""
    try:
        status = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP `port` (IPv4 or IPv6, any address)."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(inode)
    return inodes


def listener_pid(port: int) -> int | None:
    """The process that listens on TCP `port` on this machine, or None when not found
    (no such listener, or its process is not ours to look into)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    return int(entry.name)
        except OSError:
            continue
    return None


def broker_pid(amqp_url: str, node: str | None = None) -> int | None:
    """The broker's OS process (beam.smp) when it runs on this machine, else None.

    First the process listening on the URL's port; failing that, `rabbitmqctl eval
    'os:getpid().'` on `node` (or rabbitmqctl's default node).
    """
    parts = urlsplit(amqp_url)
    if (parts.hostname or "") not in _LOCAL_HOSTS:
        return None
    pid = listener_pid(parts.port or 5672)
    if pid is not None:
        return pid
    command = ["rabbitmqctl", "-q", *(["-n", node] if node else []), "eval", "os:getpid()."]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30,
                                check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = result.stdout.strip().strip('"')
    return int(text) if result.returncode == 0 and text.isdigit() else None
