"""The `mailbeacon` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from pydantic import ValidationError

from mailbeacon.app.devstate import read_state
from mailbeacon.app.runner import AllInOne, Component, nats_url_file, run_component
from mailbeacon.app.summary import summary
from mailbeacon.bus.campaign_store import CampaignStore
from mailbeacon.bus.jetstream import (
    connect,
    ensure_suppression_bucket,
    provision,
    provision_patiently,
    redact_url,
)
from mailbeacon.bus.nats_auth import NatsLogin
from mailbeacon.bus.publisher import EventPublisher
from mailbeacon.bus.spool import Spool
from mailbeacon.bus.suppressions import SuppressionList
from mailbeacon.contract.campaigns import CampaignKey, InvalidCampaign, parse_manifests
from mailbeacon.contract.settings import Settings, invalid_settings
from mailbeacon.web.shutdown import wait_for_signal


class _WithPublisher:
    """A component plus the publisher and campaign mirror it was given, stopped in order.

    Its start publishes the events spooled at the last stop before the component takes
    any work (the proxy connected to NATS already, so this takes moments); its stop gives
    the component and then the publisher one drain deadline, SHUTDOWN_DRAIN_SECONDS, after
    which what NATS has not taken is spooled (docs/tracker.md "Never down").
    """

    def __init__(
        self, component: Component, publisher: EventPublisher, store: CampaignStore | None, drain: float
    ) -> None:
        self.component, self.publisher, self.store, self.drain = component, publisher, store, drain

    async def start(self) -> None:
        if self.publisher.load_spool():
            await self.publisher.spool_published()
        if self.store is not None:
            await self.store.start()
        await self.component.start()

    def begin_stopping(self) -> None:
        self.component.begin_stopping()

    async def stop(self) -> None:
        deadline = time.monotonic() + self.drain
        await self.component.stop()
        await self.publisher.close(drain_timeout=max(0.0, deadline - time.monotonic()))
        if self.store is not None:
            await self.store.stop()


async def _build_proxy(settings: Settings, nc: NATS) -> Component:
    from smtp_proxy.service import ProxyService

    kv = await provision_patiently(nc.jetstream(), settings)
    publisher = EventPublisher(nc.jetstream(), spool=Spool.under(settings.data_dir))
    store = CampaignStore(kv)
    suppressions = None
    if settings.proxy.honour_unsubscribes:
        suppressions = SuppressionList(await ensure_suppression_bucket(nc.jetstream(), settings))
    proxy = ProxyService(settings, publisher, store, suppressions=suppressions)
    return _WithPublisher(proxy, publisher, store, settings.shutdown_drain_seconds)


async def _build_aggregator(settings: Settings, nc: NATS) -> Component:
    from aggregator.service import AggregatorService

    kv = await provision_patiently(nc.jetstream(), settings)
    return AggregatorService(settings, nc.jetstream(), kv)


async def _up(settings: Settings) -> None:
    system = AllInOne(settings)
    try:
        addresses = await system.start()
        print(
            "\nmailbeacon is running (Ctrl-C stops it)\n\n"
            f"  send mail (SMTP, no auth)  {addresses.smtp}\n"
            f"  tracker (pixel, clicks)    {addresses.tracker}\n"
            f"  statistics and pages       {addresses.aggregator}/campaigns/\n"
            f"  statistics API             {addresses.aggregator}/api/campaigns\n"
            + (
                f"  outbox (relayed mail)      {addresses.aggregator}/outbox/  ({addresses.outbox})\n"
                if addresses.outbox
                else ""
            )
            + f"  Prometheus metrics         {addresses.proxy_http}/metrics (proxy), "
            f"{addresses.tracker}/metrics (tracker), {addresses.aggregator}/metrics (aggregator)\n"
            f"  NATS                       {redact_url(addresses.nats)}\n\n"
            f"Try it:  {_this_python()} -m mailbeacon.app.sendtest --smtp {addresses.smtp}\n",
            flush=True,
        )
        await wait_for_signal(settings.shutdown_delay_seconds, system.begin_stopping)
        print("\nstopping...", flush=True)
    finally:
        await system.stop()


def _nats_url(settings: Settings) -> str:
    """NATS_URL, else the NATS of the running `mailbeacon up` (mailbeacon.app.devstate), else the
    one `up` left under DATA_DIR; else a message saying what to set."""
    if settings.nats.url:
        return settings.nats.url
    running = read_state(settings)
    if running is not None and running.nats:
        return running.nats
    path = nats_url_file(settings)
    if path.exists():
        return path.read_text().strip()
    if running is not None:
        raise SystemExit(
            "error: the running `mailbeacon up` uses a NATS with credentials, which it does not write down: "
            "set MAILBEACON_NATS_URL to it"
        )
    raise SystemExit(
        "error: no NATS to talk to: start `mailbeacon up` (found from any directory through "
        f"{settings.up_state_dir()}), or set MAILBEACON_NATS_URL to your NATS server"
    )


def _aggregator_base(settings: Settings) -> str:
    """AGGREGATOR_URL or an explicitly set AGGREGATOR_LISTEN, else the running `mailbeacon up`'s
    aggregator, else the default listen address."""
    explicit = settings.aggregator.url or "listen" in settings.aggregator.model_fields_set
    if not explicit:
        running = read_state(settings)
        if running is not None:
            return running.aggregator
    return settings.aggregator.base_url()


async def _apply(settings: Settings, text: str) -> None:
    try:
        campaigns = parse_manifests(text)
    except InvalidCampaign as exc:
        raise SystemExit(f"error: {exc}") from exc
    nc = await connect(_nats_url(settings), "mailbeacon-cli", NatsLogin.from_settings(settings))
    try:
        store = CampaignStore(await provision(nc.jetstream(), settings))
        for key, spec in campaigns:
            await store.put(key, spec)
            print(f"campaign.mailbeacon.io/{key.name} configured (namespace {key.namespace})")
    finally:
        await nc.close()


def _refused(code: int, token: str | None, base: str) -> str:
    """One line for an aggregator that refused the CLI's credentials: which setting to set."""
    if code == 403:
        return (
            f"error: the aggregator at {base} refused the request (403): the token may only read; "
            "set MAILBEACON_API_TOKEN to one of the aggregator's MAILBEACON_API_TOKENS"
        )
    if token is None:
        return (
            f"error: the aggregator at {base} requires a token (401): set MAILBEACON_API_TOKEN "
            "to one of its MAILBEACON_API_TOKENS or MAILBEACON_API_READ_TOKENS"
        )
    return (
        f"error: the aggregator at {base} does not accept the token (401): check MAILBEACON_API_TOKEN "
        "(or MAILBEACON_API_TOKENS) against the aggregator's tokens"
    )


def _aggregator_get(settings: Settings, path: str, method: str = "GET") -> Any:
    base = _aggregator_base(settings)
    token = settings.aggregator.client_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{base}{path}", method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise SystemExit(_refused(exc.code, token, base)) from None
        raise SystemExit(f"error: {exc.code} {exc.read().decode(errors='replace')}") from exc
    except urllib.error.URLError as exc:
        raise SystemExit(
            f"error: aggregator not reachable at {base} ({exc.reason}): start `mailbeacon up`, or set "
            "MAILBEACON_AGGREGATOR_URL to the aggregator's address"
        ) from exc


def _print_events(settings: Settings, args: argparse.Namespace) -> None:
    """Stored events, newest first, one line each (or the API's JSON with --json)."""
    query: dict[str, str | list[str]] = {
        name: value
        for name, value in (("type", args.type or []), ("since", args.since), ("until", args.until))
        if value
    }
    path = f"/api/campaigns/{args.campaign}/events" if args.campaign else "/api/events"
    remaining = args.limit
    cursor: str | None = None
    while remaining > 0:
        page_query = {**query, "limit": str(min(remaining, 500)), **({"cursor": cursor} if cursor else {})}
        page = _aggregator_get(settings, f"{path}?{urllib.parse.urlencode(page_query, doseq=True)}")
        for event in page["events"]:
            if args.json:
                print(json.dumps(event))
            else:
                print(
                    f"{event['occurred_at']}  {event['type']:<12} {event['campaign'] or '-':<28} "
                    f"{event['recipient'] or '-':<28} {event['detail'] or ''}"
                )
        remaining -= len(page["events"])
        cursor = page.get("next_cursor")
        if not cursor or not page["events"]:
            break


def _campaign_arg(value: str) -> CampaignKey:
    try:
        return CampaignKey.parse(value)
    except InvalidCampaign as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return number


def _manifest_text(filename: str) -> str:
    if filename == "-":
        return sys.stdin.read()
    try:
        return Path(filename).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"error: cannot read {filename}: {getattr(exc, 'strerror', None) or exc}") from exc


def _this_python() -> str:
    """The interpreter running mailbeacon, as short as it can be said from here (.venv/bin/python)."""
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailbeacon", description="Email delivery tracking")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="run the whole system in one process on embedded defaults")
    for name in ("proxy", "tracker", "aggregator", "operator"):
        component = commands.add_parser(name, help=f"run the {name} component")
        if name == "tracker":
            component.add_argument(
                "--workers", type=int, default=1, help="worker processes sharing the port (SO_REUSEPORT)"
            )
        if name == "operator":
            release = component.add_subparsers(dest="operator_action").add_parser(
                "release-campaigns",
                help="take the operator's finalizer off every Campaign it serves (before uninstalling it)",
            )
            release.add_argument(
                "--stop-deployment", metavar="NAME", help="scale the operator's Deployment to 0 first"
            )
            release.add_argument("--namespace", help="that Deployment's namespace (default: this pod's)")
            release.add_argument(
                "--timeout", type=float, default=120.0, help="seconds to wait for the operator's pods to end"
            )
    commands.add_parser("migrate", help="bring the SQL schema up to date")
    campaign = commands.add_parser("campaign", help="manage campaigns").add_subparsers(
        dest="action", required=True
    )
    apply = campaign.add_parser("apply", help="define or update campaigns from Campaign manifests")
    apply.add_argument("-f", "--filename", required=True, help="YAML file with Campaign documents, or -")
    stats = commands.add_parser("stats", help="a campaign's statistics")
    stats.add_argument("campaign", type=_campaign_arg, help="NAMESPACE/NAME")
    stats.add_argument("--json", action="store_true", help="the statistics object (the API's JSON)")
    refresh = commands.add_parser("refresh", help="recompute a campaign's statistics from stored events")
    refresh.add_argument("campaign", type=_campaign_arg, help="NAMESPACE/NAME")
    commands.add_parser("campaigns", help="list campaigns with headline numbers")
    events = commands.add_parser("events", help="stored events, newest first")
    events.add_argument("campaign", nargs="?", type=_campaign_arg, help="NAMESPACE/NAME (default: all)")
    events.add_argument(
        "--type", action="append", help="only this event type (sent, delivered, opened, ...); repeatable"
    )
    events.add_argument("--since", help="RFC 3339 time or date, inclusive")
    events.add_argument("--until", help="RFC 3339 time (exclusive) or date (that day included)")
    events.add_argument(
        "--limit", type=_positive_int, default=50, help="at most this many events (default 50)"
    )
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        # One line per setting, without the value pydantic would quote (it may be a secret).
        raise SystemExit(f"invalid configuration: {invalid_settings(exc)}") from exc
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.log_level.upper() != "DEBUG":
        # Alembic announces each of its plugins at INFO on every start; the migrations it
        # runs ("Running upgrade ...") are what an operator wants to see.
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    command = args.command
    if command in ("up", "aggregator"):
        from aggregator.service import auth_policy

        auth_policy(settings)  # an aggregator that would be open beyond loopback stops here, before NATS
    if command == "up":
        asyncio.run(_up(settings))
    elif command == "proxy":
        asyncio.run(run_component(settings, _build_proxy, "proxy"))
    elif command == "tracker":
        # The tracker connects to NATS in the background: it serves pixels and clicks
        # even when NATS is unreachable at start.
        from tracker.service import run_tracker

        run_tracker(settings, max(1, args.workers))
    elif command == "aggregator":
        asyncio.run(run_component(settings, _build_aggregator, "aggregator"))
    elif command == "operator" and args.operator_action == "release-campaigns":
        from campaign_operator.release import release_command

        release_command(settings, args.stop_deployment, args.namespace, args.timeout)
    elif command == "operator":
        from campaign_operator.main import run

        asyncio.run(run(settings))
    elif command == "migrate":
        from aggregator.service import database_url
        from aggregator.store.db import open_database
        from aggregator.store.migrate import migrate

        async def run_migrations() -> tuple[str | None, str | None]:
            db = open_database(database_url(settings))
            try:
                return await migrate(db)
            finally:
                await db.dispose()

        before, after = asyncio.run(run_migrations())
        print(f"schema is up to date (revision {after}, was {before or 'empty'})")
    elif command == "campaign":
        asyncio.run(_apply(settings, _manifest_text(args.filename)))
    elif command == "stats":
        key: CampaignKey = args.campaign
        found = _aggregator_get(settings, f"/api/campaigns/{key}/statistics")
        print(json.dumps(found, indent=2) if args.json else summary(found), end="\n" if args.json else "")
    elif command == "refresh":
        print(
            json.dumps(_aggregator_get(settings, f"/api/campaigns/{args.campaign}/refresh", "POST"), indent=2)
        )
    elif command == "campaigns":
        print(json.dumps(_aggregator_get(settings, "/api/campaigns"), indent=2))
    elif command == "events":
        _print_events(settings, args)


if __name__ == "__main__":
    main()
