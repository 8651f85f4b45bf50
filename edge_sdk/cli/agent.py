"""``edge-sdk agent run``: load a bundle and serve it on the device (HTTP API and/or an input source), with
optional telemetry over MQTT and signed over-the-air updates from a model store.

The command only turns flags (over the config file) into a
:class:`~edge_sdk.device_agent.runner.RunnerConfig`; the device itself is run by
:class:`~edge_sdk.device_agent.runner.DeviceRunner`, the same class the simulated test fleet drives. Heavy imports
(the runtimes, the agent) stay inside the handler so ``edge-sdk --help`` loads no framework.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from edge_sdk.cli import _common

__all__ = ["register", "runtime_help"]


def runtime_help() -> str:
    """``--runtime`` help naming every registered runtime (built-ins and entry-point plugins), shown by ``--help``."""
    from edge_sdk.runtimes import RUNTIMES

    return f"runtime preference order, comma-separated, from: {', '.join(RUNTIMES)} (default: that order)"


def register(sub: Any) -> None:
    """Add ``agent run`` to the ``edge-sdk`` sub-parsers."""
    agsub = _common.command_group(sub, "agent", "the device agent",
                                  "edge-sdk agent run --bundle DIR [--config agent.toml] [--http HOST:PORT] "
                                  "[--source camera:0|folder:PATH|file:PATH]")
    run = agsub.add_parser("run", help="load a bundle and serve it: local HTTP API and/or an input source",
                           formatter_class=_common.RegistryHelpFormatter,
                           parents=[_common.mqtt_parent(optional=True, purpose="telemetry: broker"),
                                    _common.model_store_parent(), _common.trusted_keys_parent(),
                                    _common.allow_unsigned_parent(), _common.http_security_parent("the agent API"),
                                    _common.log_parent()])
    run.add_argument("--bundle", help="bundle directory or .tar.gz (or `bundle` in the config file)")
    run.add_argument("--config", help="agent.toml (see examples/agent.toml); flags override it")
    run.add_argument("--http", metavar="HOST:PORT", help="serve the HTTP API here (default 127.0.0.1:8080 when "
                     "no --source is given)")
    run.add_argument("--source", help="camera:N | folder:PATH | file:PATH | rtsp://... (results as JSON lines)")
    run.add_argument("--runtime", metavar="NAME,NAME,...", help=runtime_help)  # a callable: computed by --help only
    run.add_argument("--target", help="take the runtime order from this target profile (see `edge-sdk targets`)")
    run.add_argument("--artifact", help="run this artifact (format/precision) instead of choosing")
    run.add_argument("--threads", type=int, help="inference threads")
    run.add_argument("--no-verify", action="store_true", help="skip the artifact's sha256 check at load")
    run.add_argument("--on-switch", choices=["swap", "restart"], default="swap",
                     help="after an over-the-air update or rollback: swap = load the new model in this process "
                          "and serve on without a pause (default); restart = re-execute the process on it (returns "
                          "all of the old runtime's memory, e.g. against fragmentation on small devices)")
    # -- agent run: telemetry flags (any of them turns telemetry on; --mqtt comes from the shared parent) --
    run.add_argument("--fleet", help="telemetry: fleet id (default: [telemetry] fleet or 'default'); also the "
                     "fleet checked against a bundle's signed fleets")
    run.add_argument("--device", help="telemetry: device id (default: [telemetry] device or this host's name)")
    run.add_argument("--window", type=float, metavar="S", help="telemetry: seconds per window (default 10)")
    run.add_argument("--outbox", metavar="PATH", help="telemetry: SQLite outbox file (default telemetry-outbox.db)")
    run.set_defaults(func=_cmd_agent_run)


def _runner_config(args: argparse.Namespace) -> Any:
    """The flags over the config file (``--config``), as a RunnerConfig."""
    from edge_sdk.device_agent.config import AgentConfig, load_config
    from edge_sdk.device_agent.runner import RunnerConfig

    cfg = load_config(args.config) if args.config else AgentConfig()
    host, port = _common.host_port(args.http) if args.http else (None, None)
    if port is None:  # Vertex AI custom containers: listen on $AIP_HTTP_PORT (over the file, under --http)
        from edge_sdk.device_agent.protocols.tf_serving import vertex_port

        port = vertex_port()
    order = args.runtime.split(",") if args.runtime else None
    if order is None and args.target:
        from edge_sdk.targets import load_profile

        order = list(load_profile(args.target).runtimes)
    cfg = cfg.merged(bundle=args.bundle, source=args.source, artifact=args.artifact, threads=args.threads,
                     runtime_order=order, host=host, port=port, verify=False if args.no_verify else None,
                     http_token_file=args.http_token_file, http_token_env=args.http_token_env,
                     tls_cert=args.tls_cert, tls_key=args.tls_key, http_insecure=args.http_insecure,
                     http_workers=args.http_workers)
    if bool(args.http_token_file) != bool(args.http_token_env):  # a token flag replaces the file's other source
        cfg = dataclasses.replace(cfg, **({"http_token_env": None} if args.http_token_file else
                                          {"http_token_file": None}))
    cfg = cfg.with_telemetry(fleet=args.fleet, device=args.device, mqtt_url=args.mqtt, window_s=args.window,
                             outbox=args.outbox)
    keys = args.trusted_keys
    keys = keys[0] if isinstance(keys, list) and len(keys) == 1 else tuple(keys) if keys else None
    # the HTTP server and the input source follow the runner's current agent: "swap" serves on through a switch
    return RunnerConfig(agent=cfg, serve_http=bool(args.http or not cfg.source), store=args.store,
                        trusted_keys=keys, allow_unsigned=args.allow_unsigned, on_switch=args.on_switch)


def _cmd_agent_run(args: argparse.Namespace) -> int:
    from edge_sdk.device_agent.runner import DeviceRunner, exec_restart

    _common.setup_logging(args.log_level)
    runner = DeviceRunner(_runner_config(args))
    runner.install_signal_handlers()
    if runner.run():  # an update switched the model: start again on it (same arguments)
        exec_restart(sys.argv[1:])
    return 0
