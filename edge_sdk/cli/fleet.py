"""``edge-sdk fleet status`` (one line per device from the collector's database) and ``edge-sdk fleet simulate``
(N real MQTT device clients, for load tests and demos). The fleet modules are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from edge_sdk.cli._common import command_group, db_parent, json_parent, log_parent, mqtt_parent
from edge_sdk.errors import EdgeSDKError

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``fleet status`` and ``fleet simulate``."""
    fsub = command_group(sub, "fleet", "the fleet: status table, simulated devices",
                         "edge-sdk fleet status [--db URL] [--json] | edge-sdk fleet simulate --devices N ...")
    st = fsub.add_parser("status", help="one line per device: state, model, latency, errors, confidence, drift",
                         parents=[db_parent(), json_parent("print the rows as JSON"), log_parent()])
    st.add_argument("--fleet", help="only this fleet")
    st.add_argument("--since", type=float, default=900, metavar="S", help="aggregate the last S seconds (900)")
    st.set_defaults(func=_cmd_status)
    sim = fsub.add_parser("simulate", help="N real MQTT device clients sending schema-valid windows",
                          parents=[mqtt_parent(), json_parent("print the summary as JSON"), log_parent()])
    sim.add_argument("--devices", type=int, required=True, metavar="N", help="how many simulated devices")
    sim.add_argument("--fleet", default="sim")
    sim.add_argument("--processes", type=int, metavar="P", help="default: one per 250 devices, at most one per CPU")
    sim.add_argument("--window", type=float, default=1.0, metavar="S", help="seconds per window (1)")
    sim.add_argument("--duration", type=float, default=60.0, metavar="S", help="seconds of sending (60)")
    sim.add_argument("--drift-devices", type=int, default=0, metavar="K", help="K devices see darkened inputs")
    sim.add_argument("--slow-devices", type=int, default=0, metavar="K", help="K devices run --slow-factor slower")
    sim.add_argument("--slow-factor", type=float, default=3.0, metavar="X")
    sim.add_argument("--error-devices", type=int, default=0, metavar="K", help="K devices fail --error-rate")
    sim.add_argument("--error-rate", type=float, default=0.2, metavar="R")
    sim.add_argument("--outbox-dir", help="keep the device outboxes here (a rerun continues their streams)")
    sim.add_argument("--transport", default="pooled", choices=["pooled", "publisher"],
                     help="pooled: one network loop per process (default); publisher: one Publisher per device")
    sim.add_argument("--seed", type=int, default=0)
    sim.set_defaults(func=_cmd_simulate)


def _cmd_status(args: argparse.Namespace) -> int:
    from edge_sdk.fleet.dashboard.status_table import print_status
    from edge_sdk.fleet.dashboard.views import fleet_status
    from edge_sdk.fleet.db import Database

    if args.db.startswith("sqlite:///") and not Path(args.db[len("sqlite:///"):]).exists():
        raise EdgeSDKError(f"no fleet database at {args.db}: start `edge-sdk collector run --db {args.db}` first")
    with Database.connect(args.db) as db:
        rows = fleet_status(db, args.fleet, since_s=args.since)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_status(rows)
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from edge_sdk.testing.simulate import SimulationSettings, run_simulation

    settings = SimulationSettings(
        devices=args.devices, mqtt_url=args.mqtt, fleet=args.fleet, processes=args.processes,
        window_s=args.window, duration_s=args.duration, drift_devices=args.drift_devices,
        slow_devices=args.slow_devices, slow_factor=args.slow_factor, error_devices=args.error_devices,
        error_rate=args.error_rate, outbox_dir=args.outbox_dir, transport=args.transport, seed=args.seed,
        password=os.environ.get("EDGE_SDK_MQTT_PASSWORD"))
    result = run_simulation(settings, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0 if result.pending == 0 else 1
