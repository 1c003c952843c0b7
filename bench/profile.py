"""Optional py-spy flame graphs of the system's processes while a case runs (`--profile DIR`)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path


def py_spy() -> str | None:
    """The py-spy executable: beside this interpreter (the venv) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _start(exe: str, folder: Path, label: str, pids: Mapping[str, int]
           ) -> list[subprocess.Popen[bytes]]:
    folder.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", "100", "--nonblocking",
         "--output", str(folder / f"{label}-{name}.svg")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, pid in pids.items()]


@contextlib.asynccontextmanager
async def recording(folder: Path | None, label: str, pids: Mapping[str, int]
                    ) -> AsyncIterator[None]:
    """Record each Python process in `pids` for as long as the block runs, into
    `folder/<label>-<name>.svg`; does nothing without a folder. Needs ptrace rights (root,
    or kernel.yama.ptrace_scope=0)."""
    exe = py_spy() if folder is not None else None
    if folder is None or exe is None:
        yield
        return
    procs = _start(exe, folder, label, pids)
    try:
        yield
    finally:
        for proc in procs:  # py-spy writes its file when interrupted
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
