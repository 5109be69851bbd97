"""``python -m mailbeacon.app.healthcheck URL...``: the chart's ``helm test``.

Asks each component's ``/healthz`` and ``/readyz`` (through its Service in a cluster) until
both answer 200 or ``--within`` seconds have passed (a release just installed may still be
starting), prints one line per check, and exits 1 when any check never passed.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

PATHS = ("/healthz", "/readyz")

Fetch = Callable[[str], int]


def fetch_status(url: str, timeout: float = 3.0) -> int:
    """The HTTP status of a GET, or 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def check(bases: list[str], within: float, fetch: Fetch = fetch_status, pause: float = 1.0) -> dict[str, int]:
    """Last status of every check; each is asked again until it answers 200 or time is up."""
    pending = [base.rstrip("/") + path for base in bases for path in PATHS]
    results: dict[str, int] = {}
    deadline = time.monotonic() + within
    while True:
        for url in pending:
            results[url] = fetch(url)
        pending = [url for url in pending if results[url] != 200]
        if not pending or time.monotonic() >= deadline:
            return results
        time.sleep(pause)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailbeacon.app.healthcheck", description=__doc__)
    parser.add_argument("urls", nargs="+", help="base URLs of the components (http://host:port)")
    parser.add_argument("--within", type=float, default=60.0, help="seconds to wait for every check")
    args = parser.parse_args(argv)
    results = check(args.urls, args.within)
    for url, status in results.items():
        print(f"{'ok  ' if status == 200 else 'FAIL'} {url} {status or 'no answer'}", flush=True)
    return 0 if all(status == 200 for status in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
