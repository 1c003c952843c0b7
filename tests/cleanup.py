"""Deleting what a test declared on the broker: every queue and exchange under its prefix."""

from __future__ import annotations

from urllib.parse import quote, urlsplit

import httpx


def sweep_prefix(management_url: str, prefix: str) -> None:
    """Delete every queue and exchange whose name starts with `prefix`, via the management API.

    Names a service declared as a side effect (delay queues, dead-letter queues) are caught
    too. Without the management API this does nothing: the prefixed names stay behind,
    harmless to other runs.
    """
    if not prefix:
        raise ValueError("refusing to sweep an empty prefix: it would match every queue")
    parts = urlsplit(management_url)
    auth = (parts.username or "guest", parts.password or "guest")
    base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}/api"
    try:
        with httpx.Client(auth=auth, timeout=5) as client:
            for kind in ("queues", "exchanges"):
                listing = client.get(f"{base}/{kind}", params={"columns": "name,vhost"})
                listing.raise_for_status()
                for item in listing.json():
                    if item["name"].startswith(prefix):
                        client.delete(f"{base}/{kind}/{quote(item['vhost'], safe='')}/"
                                      f"{quote(item['name'], safe='')}")
    except httpx.HTTPError:
        return
