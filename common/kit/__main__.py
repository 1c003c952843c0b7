"""`python -m common.kit NAME`: run the installed service called NAME (what `shop up` starts).

Only that service is imported, so each process of `shop up` loads its own code and no other.
"""

from __future__ import annotations

import sys

from common.kit import discovery


def main(args: list[str]) -> None:
    if len(args) != 1 or args[0].startswith("-"):
        sys.exit(f"usage: python -m common.kit NAME (installed: {', '.join(discovery.names())})")
    try:
        service = discovery.service(args[0])
    except discovery.UnknownServiceError as exc:
        sys.exit(f"Error: {exc}")
    service.main()


if __name__ == "__main__":
    main(sys.argv[1:])
