"""``edge-sdk registry add|list|show|promote|holdout|serve``, ``deploy`` and ``rollback``: model versions in the
fleet database, the evaluation gate, and staged rollouts to devices over MQTT.

Every command here takes the same ``--db`` and ``--registry-dir`` (parents from ``_common``); ``deploy`` and
``rollback`` also take ``--mqtt`` and ``--rollback-key`` (the release key that signs rollback authorisations, which
devices need to go back to a lower version_code). ``promote`` and ``deploy`` refuse a version whose signature was
not verified unless ``--allow-unsigned`` (development). The fleet modules are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from edge_sdk.cli._common import (
    add_alias,
    allow_unsigned_parent,
    command_group,
    db_parent,
    host_port,
    json_parent,
    log_parent,
    mqtt_parent,
    registry_parent,
    rollback_key_parent,
    setup_logging,
    trusted_keys_parent,
)

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``registry`` actions, ``deploy`` and ``rollback``."""
    db, store = db_parent(), registry_parent()
    common = [db, store, log_parent()]
    unsigned, rollback_key = allow_unsigned_parent(), rollback_key_parent()
    rsub = command_group(sub, "registry", "model versions: add, list, show, promote (evaluation gate), holdout, serve",
                         "edge-sdk registry add|list|show|promote|holdout|serve ... (see --help)")
    ra = rsub.add_parser("add", parents=[*common, trusted_keys_parent()],
                         help="register a bundle directory or .tar.gz (name/version from its manifest); with "
                              "--trusted-keys, refuse bundles whose signature does not verify")
    ra.add_argument("bundle")
    ra.set_defaults(func=_cmd_add)
    rl = rsub.add_parser("list", parents=[*common, json_parent("print the versions as JSON")],
                         help="registered versions")
    rl.add_argument("name", nargs="?")
    rl.set_defaults(func=_cmd_list)
    rs = rsub.add_parser("show", parents=common, help="one version as JSON: lineage, validation, holdout, transitions")
    rs.add_argument("ref", metavar="NAME[:VERSION]")
    rs.add_argument("--manifest", action="store_true", help="include the full manifest")
    rs.set_defaults(func=_cmd_show)
    rp = rsub.add_parser("promote", parents=[*common, unsigned],
                         help="evaluation gate against the active version, then canary (signed versions only, "
                              "unless --allow-unsigned)")
    rp.add_argument("name")
    rp.add_argument("version")
    rp.add_argument("--force", metavar="REASON", help="promote even if the gate refuses (the reason is recorded)")
    drop = rp.add_argument("--max-accuracy-drop", dest="tolerance", type=float, default=0.5, metavar="PP",
                           help="accepted accuracy loss against the active version, in percentage points "
                                "(default 0.5)")
    add_alias(rp, drop, "--tolerance")
    rp.set_defaults(func=_cmd_promote)
    rh = rsub.add_parser("holdout", parents=common, help="register the evaluation set of a model name")
    rh.add_argument("name")
    rh.add_argument("file", help=".npz with arrays `inputs` (model input layout) and `labels` (class indices)")
    rh.set_defaults(func=_cmd_holdout)
    rv = rsub.add_parser("serve", parents=[db, store, log_parent("INFO")],
                         help="serve archives at /bundles/NAME/VERSION.tar.gz (HTTP ranges)")
    rv.add_argument("--http", default="127.0.0.1:8081", metavar="HOST:PORT", help="listen here (127.0.0.1:8081)")
    rv.set_defaults(func=_cmd_serve)

    mq = mqtt_parent(purpose="broker the commands go through")
    d = sub.add_parser("deploy", parents=[*common, mq, unsigned, rollback_key],
                       help="staged rollout of a promoted version to a fleet over MQTT")
    d.add_argument("name")
    d.add_argument("version")
    d.add_argument("--fleet", required=True)
    d.add_argument("--stages", default="5,25,100", help="cumulative percentages (default 5,25,100)")
    d.add_argument("--hold", default="10m", help="time per stage before it is judged: 30s, 10m, 1h (default 10m)")
    d.add_argument("--devices", metavar="ID,ID,...",
                   help="deploy to these devices only (comma-separated) instead of the fleet's")
    d.add_argument("--base-url", default=os.environ.get("EDGE_SDK_BUNDLE_URL"),
                   help="where devices download bundles: http://COLLECTOR:PORT (archives under /bundles/) or a "
                        "template with {name} and {version} (default $EDGE_SDK_BUNDLE_URL)")
    d.add_argument("--follow", action="store_true", help="judge the deployment here until it ends (instead of "
                   "leaving it to the collector)")
    d.add_argument("--tick", type=float, default=5.0, metavar="S", help="--follow: seconds between checks")
    d.set_defaults(func=_cmd_deploy)
    rb = sub.add_parser("rollback", parents=[*common, mq, rollback_key],
                        help="roll back the latest deployment of a model in a fleet")
    rb.add_argument("name")
    rb.add_argument("--fleet", required=True)
    rb.add_argument("--reason", default="rolled back by hand")
    rb.set_defaults(func=_cmd_rollback)


@contextlib.contextmanager
def _registry(args: argparse.Namespace) -> Iterator[Any]:
    """The migrated fleet database and the registry on it, for the duration of one command."""
    from edge_sdk.fleet.db import Database
    from edge_sdk.fleet.lifecycle.registry import Registry

    with Database.connect(args.db) as db:
        db.migrate()
        yield Registry(db, args.store, trusted_keys=getattr(args, "trusted_keys", None))


def _cmd_add(args: argparse.Namespace) -> int:
    from edge_sdk.progress import fmt_bytes

    with _registry(args) as reg:
        rec = reg.add(args.bundle)
    signed = f", signed by {rec.signed_key_id}" if rec.signed_key_id else ", unsigned"
    print(f"{rec.ref}: {rec.state}, {fmt_bytes(rec.size_bytes)}, sha256 {rec.bundle_sha256}{signed} "
          f"({rec.archive_path})")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from edge_sdk.progress import fmt_bytes

    with _registry(args) as reg:
        recs = reg.list(args.name)
    if args.json:
        print(json.dumps([r.to_dict() for r in recs], indent=2))
        return 0
    if not recs:
        print("no model versions registered: add one with `edge-sdk registry add BUNDLE`", file=sys.stderr)
    for r in recs:
        acc = (r.holdout_result or {}).get("accuracy")
        print(f"{r.name:<24} {r.version:<12} {r.state:<10} {fmt_bytes(r.size_bytes):>10}  "
              f"{'holdout ' + format(100 * acc, '.2f') + '%' if acc is not None else '':<16} "
              f"{'signed ' + r.signed_key_id if r.signed_key_id else 'unsigned'}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from edge_sdk.fleet.lifecycle.registry import parse_model_ref

    with _registry(args) as reg:
        rec = reg.show(*parse_model_ref(args.ref))
        hold = reg.holdout(rec.name)
        print(json.dumps({**rec.to_dict(manifest=args.manifest), "holdout": hold.__dict__ if hold else None,
                          "transitions": reg.transitions(rec.name, rec.version)}, indent=2))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    with _registry(args) as reg:
        p = reg.promote(args.name, args.version, force_reason=args.force, tolerance_pp=args.tolerance,
                        allow_unsigned=args.allow_unsigned)
    how = f"FORCED ({args.force}) past a refusing gate" if p.forced else "gate passed"
    print(f"{p.record.ref} promoted to {p.record.state}: {how}: {p.decision.reason}")
    return 0


def _cmd_holdout(args: argparse.Namespace) -> int:
    with _registry(args) as reg:
        h = reg.register_holdout(args.name, args.file)
    print(f"holdout for {h.name}: {h.samples} samples, sha256 {h.sha256}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import threading

    from edge_sdk.fleet.lifecycle.bundle_server import BundleHTTPServer

    setup_logging(args.log_level)
    host, port = host_port(args.http)
    with _registry(args) as reg, BundleHTTPServer(reg, host, port) as srv:
        print(f"serving registry archives at {srv.url}/bundles/NAME/VERSION.tar.gz (Ctrl-C stops)", file=sys.stderr)
        threading.Event().wait()
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    import time

    from edge_sdk.fleet.db import Database
    from edge_sdk.fleet.lifecycle.commands import MqttCommandPublisher
    from edge_sdk.fleet.lifecycle.rollout import Rollout, parse_duration

    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    with Database.connect(args.db) as db, MqttCommandPublisher(args.mqtt) as publish:
        db.migrate()
        ro = Rollout(db, publish, args.base_url, allow_unsigned=args.allow_unsigned, rollback_key=args.rollback_key)
        dep_id = ro.start(args.name, args.version, args.fleet, args.stages, parse_duration(args.hold), devices)
        dep = ro.deployment(dep_id)
        print(f"deployment {dep_id}: {args.name}:{args.version} -> fleet {args.fleet} in stages {dep['stages']} "
              f"(previous version {dep['previous_version'] or 'unknown'}); stage 1 sent to "
              f"{len(dep['devices_sent'])} device(s): {', '.join(d['device'] for d in dep['devices_sent'])}")
        while args.follow and dep["state"] == "running":
            time.sleep(args.tick)
            for dec in ro.tick():
                print(f"{dec.decision}: {dec.reason}")
            dep = ro.deployment(dep_id)
        if args.follow:
            print(f"deployment {dep_id} {dep['state']}: {dep['reason']}")
            return 0 if dep["state"] == "completed" else 1
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from edge_sdk.fleet.db import Database
    from edge_sdk.fleet.lifecycle.commands import MqttCommandPublisher
    from edge_sdk.fleet.lifecycle.rollout import Rollout

    with Database.connect(args.db) as db, MqttCommandPublisher(args.mqtt) as publish:
        db.migrate()
        ro = Rollout(db, publish, rollback_key=args.rollback_key)
        dec = ro.rollback(args.name, args.fleet, reason=args.reason)
        print(f"deployment {dec.deployment_id} rolled back: {dec.reason}")
    return 0
