"""Give freed memory back to the system, so a long-running service stays at its working size.

Measured with `python -m bench --cases growth`, the order service's resident memory grew
by a quarter over 100,000 orders while what it held did not grow (pymalloc's arenas,
malloc's blocks in use and SQLite's page cache stayed flat): glibc kept the memory freed
between messages. Two of its habits, both undone here (Dask's documentation on "memory not
released back to the OS" gives the same two remedies for its workers):

- it keeps free memory at the top of its heap up to a threshold, and raises that threshold
  by itself (up to 64 MiB) each time a large block is freed: `return_freed_memory` fixes
  it at 64 KiB;
- free pages in the middle of the heap, between blocks still in use, are kept until
  `malloc_trim` is called: `trim_forever` calls it every few seconds (a few milliseconds
  the first time, microseconds after).

Nothing is done on other C libraries.
"""

from __future__ import annotations

import asyncio
import ctypes
import os

#: mallopt's parameter for the trim threshold (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
#: Free bytes kept at the top of the heap before they go back to the system.
TRIM_THRESHOLD = 64 * 1024
#: What an operator sets to choose another threshold (glibc reads it at start).
ENV = "MALLOC_TRIM_THRESHOLD_"


def return_freed_memory() -> bool:
    """Set glibc's trim threshold to `TRIM_THRESHOLD`, unless the operator chose one.

    Returns whether it was set: false on another C library or when MALLOC_TRIM_THRESHOLD_
    is in the environment.
    """
    if ENV in os.environ or not _glibc():
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


#: Seconds between two trims: the memory freed meanwhile is what the service holds extra.
TRIM_INTERVAL = 10.0


async def trim_forever(interval: float = TRIM_INTERVAL) -> None:
    """Hand the heap's free pages back to the system every `interval` seconds, until
    cancelled; returns at once on another C library."""
    if not _glibc():
        return
    malloc_trim = ctypes.CDLL(None).malloc_trim
    while True:
        await asyncio.sleep(interval)
        malloc_trim(0)


def _glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):  # not a name this system knows: not glibc
        return False
