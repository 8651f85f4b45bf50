"""``edge-sdk collector run``: the fleet collector, MQTT telemetry/events/status into the fleet database, with gap
repair, alerts and (with ``--http``) the dashboard. The collector and the dashboard are imported in the handler.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from edge_sdk.cli import _common
from edge_sdk.errors import EdgeSDKError

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``collector run``."""
    csub = _common.command_group(sub, "collector",
                                 "the fleet collector: MQTT telemetry into a database, gap repair, alerts",
                                 "edge-sdk collector run [--mqtt URL] [--db URL] [--http HOST:PORT] ...")
    service = [_common.mqtt_parent(), _common.mqtt_tls_parent(), _common.db_parent(), _common.log_parent("INFO")]
    run = csub.add_parser("run", help="subscribe to the fleet's telemetry/events/status and store them (SIGTERM stops)",
                          parents=[*service, _common.http_security_parent("the dashboard and API")])
    run.add_argument("--http", metavar="HOST:PORT", help="also serve the dashboard, JSON API and /metrics here")
    run.add_argument("--samples-dir", metavar="DIR", help="take devices' captured data samples (POST /api/samples on "
                     "--http) and keep them here, indexed in the database (`edge-sdk data export` reads them)")
    run.add_argument("--max-sample-bytes", type=int, default=8 * 1024 * 1024, metavar="N",
                     help="largest sample accepted (default 8 MiB)")
    run.add_argument("--fleet", default="+", help="only this fleet (default: every fleet)")
    run.add_argument("--rules", help="alert rules TOML overriding the shipped edge_sdk/fleet/collector/alerts.toml")
    run.add_argument("--webhook", help="POST opened/resolved alerts as JSON to this URL")
    run.add_argument("--bundle", action="append", default=[], help="bundle whose manifest baseline the drift rule "
                     "pools windows against (repeatable; registered models are found in the database)")
    run.add_argument("--no-shared", action="store_true", help="plain instead of shared ($share/...) subscriptions")
    run.add_argument("--session-expiry", type=int, default=7 * 24 * 3600, metavar="SECONDS",
                     help="how long the broker keeps this collector's session (and queues its share of a shared "
                     "subscription) while it is down; default 7 days")
    run.add_argument("--protocol", default="auto", choices=["auto", "5", "3.1.1"],
                     help="MQTT version (auto: v5, or 3.1.1 for a broker without v5 such as the embedded one)")
    run.set_defaults(func=_cmd_collector_run)


def _cmd_collector_run(args: argparse.Namespace) -> int:
    from edge_sdk.bundle import Bundle
    from edge_sdk.fleet.collector.service import Collector

    _common.setup_logging(args.log_level)
    baselines = {}
    for path in args.bundle:
        m = Bundle.load(path).manifest
        if not m.baseline:
            raise EdgeSDKError(f"--bundle {path}: the manifest has no baseline: rebuild it with calibration data")
        baselines[(m.name, m.version)] = m.baseline
    listen = _common.host_port(args.http) if args.http else None
    if args.samples_dir and listen is None:
        raise EdgeSDKError("--samples-dir needs --http HOST:PORT: devices upload their samples over HTTP")
    security = None
    if listen is not None:  # a missing token or a bad certificate fails here, before the database and the broker
        security = _common.http_security(args)
        security.check_bind(listen[0], listen[1], "the collector's dashboard and API")
        security.ssl_context()
    col = Collector(args.db, args.mqtt, fleet=args.fleet, client_id=args.client_id, username=args.username,
                    password=args.password or os.environ.get("EDGE_SDK_MQTT_PASSWORD"), ca_file=args.ca_file,
                    cert_file=args.cert_file, key_file=args.key_file, shared=not args.no_shared, rules=args.rules,
                    webhook=args.webhook, baselines=baselines, protocol=args.protocol,
                    session_expiry_s=args.session_expiry)
    http = None
    if listen is not None:
        from edge_sdk.fleet.dashboard.server import CollectorHTTP  # the dashboard (loaded only when asked for)
        from edge_sdk.httpbase import HTTPLimits

        limits = HTTPLimits(workers=args.http_workers) if args.http_workers else None
        samples = None
        if args.samples_dir:
            from edge_sdk.fleet.samples.store import SampleStore

            samples = SampleStore(col.db, args.samples_dir, max_sample_bytes=args.max_sample_bytes)
        http = CollectorHTTP(col.db, listen[0], listen[1], stats=col.stats, security=security, limits=limits,
                             samples=samples)
        http.start()
        print(f"dashboard: {http.url}", file=sys.stderr)
    print(f"collector {col.client_id}: {col.mqtt_display} -> {col.db!r}", file=sys.stderr, flush=True)
    return col.run_forever(on_stop=http.shutdown if http is not None else None)

