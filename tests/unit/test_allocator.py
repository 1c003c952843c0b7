"""Memory a service frees goes back to the system (glibc), not kept as the heap's reserve."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common.kit.allocator import ENV, return_freed_memory

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc only"),
]

# In a process of its own: a large block freed (glibc then raises its trim threshold, as in
# a long-running service), then 20 MB of small blocks allocated and freed. Prints the
# anonymous memory (MiB) before and after.
SCRIPT = """
import sys
from common.kit.allocator import return_freed_memory
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) // 1024
if sys.argv[1] == "tuned":
    assert return_freed_memory()
big = bytearray(16 * 2**20)
del big
before = rss()
blocks = [bytes(2000) for _ in range(10_000)]
del blocks
print(before, rss())
"""


# Then the heap's middle: 40 MB of blocks of which one in ten stays, so whole pages are free
# between blocks in use; trimmed every 10 ms (or not at all), until 20 MB went back or 5 s.
FRAGMENTED = """
import asyncio, sys, time
from common.kit.allocator import return_freed_memory, trim_forever
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) // 1024
assert return_freed_memory()
blocks = [bytes(2000) for _ in range(20_000)]
kept = blocks[::10]
del blocks
before = rss()
async def main():
    if sys.argv[1] == "default":
        return
    task = asyncio.create_task(trim_forever(0.01))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and rss() > before - 20:
        await asyncio.sleep(0.01)
    task.cancel()
asyncio.run(main())
print(before, rss())
"""


def _kept_mib(mode: str, script: str = SCRIPT) -> int:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    out = subprocess.run([sys.executable, "-c", script, mode], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    before, after = int(out[0]), int(out[1])
    return after - before


def test_freed_memory_goes_back_to_the_system() -> None:
    """Untuned, glibc keeps the 20 MB freed (the control: the script shows the problem);
    tuned as every service starts, it gives them back."""
    assert _kept_mib("default") >= 15
    assert _kept_mib("tuned") <= 2


def test_free_pages_between_blocks_in_use_go_back_when_trimmed() -> None:
    """A fragmented heap keeps its free pages (the control); the service's periodic trim
    hands them back."""
    assert _kept_mib("default", FRAGMENTED) >= -2
    assert _kept_mib("trimmed", FRAGMENTED) <= -20


def test_an_operators_choice_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "1048576")
    assert return_freed_memory() is False
