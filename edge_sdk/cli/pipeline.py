"""``edge-sdk pipeline run|serve|check``: the retraining pipeline (edge_sdk.pipeline) from the command line.

``run`` runs the steps (all, ``--from STEP`` onwards, or ``--only STEP`` of an earlier run's ``--workdir``) and
exits 0 when they succeeded, 1 when the gate refused the new version, 2 when a step failed or another run of the
model is in progress (the one-line reason on stderr, the record in WORKDIR/run.json). ``serve`` listens for the
collector's alert webhook and starts runs; ``check`` reads pipeline.toml and says what is wrong in one line.
Schedulers: cron (``0 3 * * * edge-sdk pipeline run /srv/edge/pipeline.toml``) or the systemd timer in
examples/edge-sdk-pipeline.timer; overlapping runs are refused by the per-model lock.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edge_sdk.cli._common import command_group, host_port, json_parent, log_parent, setup_logging

__all__ = ["register"]

_STEPS = "gather, train, convert, evaluate, register (sign + register), deploy"


def register(sub: Any) -> None:
    """Add ``pipeline run``, ``pipeline serve`` and ``pipeline check``."""
    psub = command_group(sub, "pipeline", "retraining pipeline: gather, train, convert, evaluate, register, deploy",
                         "edge-sdk pipeline run|serve|check pipeline.toml ... (see --help)")
    r = psub.add_parser("run", parents=[json_parent("print run.json on stdout"), log_parent("INFO")],
                        help="run the pipeline's steps (one run at a time per model)")
    r.add_argument("config", metavar="pipeline.toml")
    r.add_argument("--from", dest="from_step", metavar="STEP", help=f"start at this step ({_STEPS})")
    r.add_argument("--only", metavar="STEP", help="run only this step")
    r.add_argument("--workdir", metavar="DIR", help="the run's folder (default <[pipeline] workdir>/<model>/<run "
                   "id>; required with --from / --only)")
    r.set_defaults(func=_cmd_run)
    s = psub.add_parser("serve", parents=[log_parent("INFO")],
                        help="start runs from the collector's alert webhook (Alertmanager v4 body)")
    s.add_argument("config", metavar="pipeline.toml")
    s.add_argument("--on", metavar="ALERTS", help="alert names that start a run, comma-separated (default "
                   "[triggers] on: drift,confidence_drop,accuracy_drop)")
    s.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=9095, help="listen port (default 9095; 0: a free one)")
    s.add_argument("--http", metavar="HOST:PORT", help="listen address and port in one (instead of --host/--port)")
    s.add_argument("--token-file", "--http-token-file", dest="token_file", metavar="FILE",
                   help="file holding the webhook token (>= 16 characters): POSTs then need 'Authorization: Bearer "
                        "<token>' (Alertmanager http_config.authorization)")
    s.add_argument("--token-env", "--http-token-env", dest="token_env", metavar="NAME",
                   help="environment variable holding the token (instead of a file)")
    s.add_argument("--insecure", "--http-insecure", dest="insecure", action="store_true",
                   help="listen on a non-loopback address without a token")
    s.set_defaults(func=_cmd_serve)
    c = psub.add_parser("check", parents=[log_parent()],
                        help="read pipeline.toml and report the first problem in one line")
    c.add_argument("config", metavar="pipeline.toml")
    c.set_defaults(func=_cmd_check)


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_sdk.pipeline import load_config, run_pipeline

    cfg = load_config(args.config)

    def progress(step: str, status: str) -> None:
        print(f"{step}: {status}", file=sys.stderr, flush=True)

    result = run_pipeline(cfg, workdir=args.workdir, from_step=args.from_step, only=args.only, on_step=progress)
    if args.json:
        print(json.dumps(result.record, indent=2, default=str))
    rec = result.record
    if result.ok:
        version = f" {cfg.model.name}:{rec['version']}" if rec.get("version") else ""
        dep = f", deployment {rec['deployment_id']}" if rec.get("deployment_id") else ""
        print(f"pipeline run {rec['run_id']} succeeded{version}{dep} (record: {result.workdir / 'run.json'})",
              file=sys.stderr)
        return 0
    print(f"error: pipeline run {rec['run_id']} {result.status} at {rec['failed_step']}: {rec['error']} (record: "
          f"{result.workdir / 'run.json'})", file=sys.stderr)
    return 1 if result.status == "refused" else 2


def _cmd_serve(args: argparse.Namespace) -> int:
    import threading

    from edge_sdk.httpbase import HTTPSecurity
    from edge_sdk.pipeline import load_config
    from edge_sdk.pipeline.serve import PipelineServer

    setup_logging(args.log_level)
    cfg = load_config(args.config)
    host, port = host_port(args.http) if args.http else (args.host, args.port)
    security = HTTPSecurity.load(token_file=args.token_file, token_env=args.token_env, allow_insecure=args.insecure)
    on = tuple(a.strip() for a in args.on.split(",") if a.strip()) if args.on else None
    with PipelineServer(cfg, host, port, on=on, security=security) as srv:
        print(f"pipeline {cfg.model.name}: listening for alert webhooks at {srv.url}/alerts (runs on "
              f"{','.join(srv.on)}; Ctrl-C stops)", file=sys.stderr, flush=True)
        threading.Event().wait()
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from edge_sdk.pipeline import load_config

    cfg = load_config(args.config)
    print(f"{args.config}: ok — model {cfg.model.name}, train {cfg.train.entry}, gate +{cfg.evaluate.min_gain_pp:g} "
          f"pp drifted / -{cfg.evaluate.max_loss_pp:g} pp original, "
          + (f"deploy to {cfg.deploy.fleet} in stages {cfg.deploy.stages}" if cfg.deploy.enabled else "no deploy"))
    return 0
