"""The ``edge-sdk`` command. Each sub-command imports its implementation inside its body, so
``edge-sdk --help`` loads no framework.

Exit codes: 0 success, 1 an artifact failed validation (the bundle holds the others), 2 bad input
or a missing dependency (nothing written).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edge_sdk._deps import has_module
from edge_sdk.errors import EdgeSDKError, MissingDependencyError, ValidationError

__all__ = ["build_parser", "main"]


def _shape(text: str) -> list[int]:
    try:
        dims = [int(x) for x in text.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape {text!r} must be integers like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"input shape {text!r} must be positive integers like 1,3,224,224")
    return dims


def _named_shape(text: str) -> tuple[str | None, list[int]]:
    """``1,3,224,224`` (the first input) or ``NAME=1,3,224,224`` (one input of a multi-input model)."""
    name, sep, dims = text.rpartition("=") if "=" in text else ("", "", text)
    return (name.strip() or None) if sep else None, _shape(dims)


def _shape_spec(items: list[tuple[str | None, list[int]]] | None) -> Any:
    """Repeated --input-shape values -> one shape, or {input name: shape}."""
    if not items:
        return None
    if len(items) == 1 and items[0][0] is None:
        return items[0][1]
    if any(name is None for name, _ in items):
        raise EdgeSDKError("--input-shape: name every input when giving several (--input-shape input_ids=1,128 "
                           "--input-shape attention_mask=1,128)")
    return {name: dims for name, dims in items}


def _named_values(items: list[str] | None, flag: str) -> Any:
    """Repeated NAME=VALUE (or one bare VALUE for the first input) -> {name: value} or [value]."""
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return [items[0].strip()]
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise EdgeSDKError(f"{flag} {item!r} must look like NAME=VALUE when giving several")
        out[name.strip()] = value.strip()
    return out


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated numbers") from None


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like 224x224") from None
    return h, w


def _add_source_args(c: argparse.ArgumentParser, *, build: bool = False) -> None:
    """Arguments shared by ``convert`` and ``build``."""
    c.add_argument("source", help="model file (.pt/.pth/.pt2/TorchScript, .keras/.h5, SavedModel dir, .onnx)")
    if not build:
        c.add_argument("--to", default="onnx", help="targets: tflite,coreml,openvino,onnx (onnx also writes .ort)")
        c.add_argument("--precision", help="fp32,fp16,dynamic,int8,palettized (default fp32; an existing .tflite or "
                       "OpenVINO IR: its own precision)")
    c.add_argument("--calib", help="calibration data: .npy/.npz of ready tensors or an image folder")
    c.add_argument("--out", required=True, help="bundle directory to create")
    c.add_argument("--input-shape", type=_named_shape, action="append", metavar="[NAME=]DIMS",
                   help="e.g. 1,3,224,224; pins dynamic axes; NAME=DIMS per input for multi-input models (repeatable)")
    c.add_argument("--input-dtype", action="append", metavar="[NAME=]DTYPE",
                   help="integer inputs, e.g. input_ids=int64 (repeatable; default float32)")
    c.add_argument("--dynamic", default="", metavar="AXES",
                   help="keep these axes dynamic in ONNX/OpenVINO artifacts of an ONNX source: batch,height,width,"
                        "sequence or indices")
    c.add_argument("--model-class", help="pkg.module:Class for state_dict sources")
    c.add_argument("--custom-objects", action="append", metavar="MODULE:NAME",
                   help="custom Keras layers/functions the model needs (repeatable)")
    c.add_argument("--route", action="append", metavar="[TARGET=]NAME",
                   help="force a conversion route, e.g. tflite=onnx2tf (default: try each route in order)")
    c.add_argument("--framework", choices=["pytorch", "keras", "onnx", "tflite", "openvino"],
                   help="override framework detection")
    c.add_argument("--val", help="held-out validation inputs (.npy/.npz or image folder)")
    c.add_argument("--val-labels", help=".npy of integer labels for --val (reports accuracy)")
    c.add_argument("--labels", help="text file with one class label per line")
    c.add_argument("--name", help="bundle name (default: source file stem)")
    c.add_argument("--version", dest="model_version", default="1", help="bundle version (default 1)")
    c.add_argument("--task", choices=["classification", "other"], help="default: detected from the output shape")
    c.add_argument("--json", action="store_true", help="print a JSON summary on stdout, no progress")
    c.add_argument("--keep-failed", action="store_true", help="keep artifacts that fail validation (passed: false)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    if not build:
        c.add_argument("--no-ort", action="store_true", help="do not write the .ort file beside the onnx target")
    g = c.add_argument_group("preprocessing (recorded in the manifest; needed for image-folder data)")
    g.add_argument("--preset", choices=["imagenet"], help="imagenet: 224 centre crop, RGB, ImageNet mean/std, NCHW")
    g.add_argument("--resize", type=_size, help="HxW")
    g.add_argument("--resize-mode", choices=["stretch", "center_crop"], default="stretch")
    g.add_argument("--color", choices=["RGB", "BGR", "GRAY"], default="RGB")
    g.add_argument("--layout", choices=["NCHW", "NHWC"], help="default: the source model's layout")
    g.add_argument("--scale", type=float, default=1 / 255)
    g.add_argument("--mean", type=_floats, default=(0.0,))
    g.add_argument("--std", type=_floats, default=(1.0,))
    o = c.add_argument_group("per-target options")
    o.add_argument("--calib-limit", type=int, default=200, help="calibration samples used (default 200)")
    o.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    o.add_argument("--onnx-activations", choices=["uint8", "int8"], default="uint8",
                   help="ONNX int8 activation type (uint8 is faster on x86 ORT)")
    o.add_argument("--ort-platform", choices=["amd64", "arm"],
                   help=".ort layout optimisation (default amd64, or the target profile's)")
    o.add_argument("--coreml-target", help="Core ML minimum deployment target (default iOS16, or the profile's)")
    o.add_argument("--palette-bits", type=int, default=6, help="Core ML palettization bits")
    o.add_argument("--float-io", action="store_true", help="TFLite int8 keeps float inputs/outputs")
    o.add_argument("--tolerance", action="append", default=[], metavar="PRECISION:KEY=VALUE",
                   help="override a validation limit, e.g. int8:min_cosine=0.9 (repeatable)")
    # -- accuracy budget with automatic fallback (issue 7) --
    ab = c.add_argument_group("accuracy budget (int8 over it falls back: calibration, layers in float, 16-bit "
                              "activations, fp16)")
    if not build:  # build has its own --max-accuracy-drop (also used to select the variant)
        ab.add_argument("--max-accuracy-drop", type=float, metavar="PP",
                        help="max accuracy drop in percentage points (top-1 disagreement without --val-labels)")
    ab.add_argument("--min-agreement", type=float, metavar="FRAC", help="label-free: min top-1 agreement, e.g. 0.95")
    ab.add_argument("--min-cosine", type=float, metavar="X", help="min cosine similarity of the outputs")
    # -- end accuracy budget --



def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``edge-sdk``."""
    p = argparse.ArgumentParser(prog="edge-sdk", description="Convert, validate and bundle models for devices.")
    p.add_argument("--version", action="version", version=f"edge-sdk {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a model to validated device artifacts in one bundle")
    _add_source_args(c)
    bld = sub.add_parser("build", help="build for a named device: convert, validate, check, benchmark, select")
    bld.add_argument("--target", required=True, help="profile name (see `edge-sdk targets`) or a .toml file")
    bld.add_argument("--max-accuracy-drop", type=float, metavar="PP",
                     help="accuracy budget in percentage points (default: the profile's)")
    bld.add_argument("--runs", type=int, default=50, help="benchmark runs per candidate (default 50)")
    _add_source_args(bld, build=True)
    bm = sub.add_parser("benchmark", help="latency, memory, size and accuracy of every artifact of a bundle")
    bm.add_argument("bundle")
    bm.add_argument("--runs", type=int, default=100)
    bm.add_argument("--warmup", type=int, default=10)
    bm.add_argument("--threads", default="1", help="thread counts to measure, e.g. 1,2")
    bm.add_argument("--json", action="store_true")
    bm.add_argument("--plot", help="write a PNG of latency against size")
    bm.add_argument("--store", action="store_true", help="store the results (with the host) in the manifest")
    ck = sub.add_parser("check", help="check a bundle's artifacts against a target profile")
    ck.add_argument("bundle")
    ck.add_argument("--target", required=True, help="profile name (see `edge-sdk targets`) or a .toml file")
    ck.add_argument("--json", action="store_true")
    ag = sub.add_parser("agent", help="the device agent")
    agsub = ag.add_subparsers(dest="agent_command", metavar="ACTION")
    run = agsub.add_parser("run", help="load a bundle and serve it: local HTTP API and/or an input source")
    run.add_argument("--bundle", help="bundle directory or .tar.gz (or `bundle` in the config file)")
    run.add_argument("--config", help="agent.toml (see examples/agent.toml); flags override it")
    run.add_argument("--http", metavar="HOST:PORT", help="serve the HTTP API here (default 127.0.0.1:8080 when "
                     "no --source is given)")
    run.add_argument("--source", help="camera:N | folder:PATH | file:PATH | rtsp://... (results as JSON lines)")
    run.add_argument("--runtime", help="runtime preference order, e.g. onnxruntime,openvino,litert")
    run.add_argument("--target", help="take the runtime order from this target profile (see `edge-sdk targets`)")
    run.add_argument("--artifact", help="run this artifact (format/precision) instead of choosing")
    run.add_argument("--threads", type=int, help="inference threads")
    run.add_argument("--no-verify", action="store_true", help="skip the artifact's sha256 check at load")
    # -- agent run: telemetry flags (any of them turns telemetry on) --
    run.add_argument("--fleet", help="telemetry: fleet id (default: [telemetry] fleet or 'default')")
    run.add_argument("--device", help="telemetry: device id (default: [telemetry] device or this host's name)")
    run.add_argument("--mqtt", metavar="URL", help="telemetry: broker, mqtt://host:1883 or mqtts://host:8883")
    run.add_argument("--window", type=float, metavar="S", help="telemetry: seconds per window (default 10)")
    run.add_argument("--outbox", metavar="PATH", help="telemetry: SQLite outbox file (default telemetry-outbox.db)")
    # -- end of agent run telemetry flags --
    run.add_argument("--store", metavar="DIR", help="model store for signed over-the-air updates (cmd/update over "
                     "MQTT); --bundle then installs the first model into it")
    run.add_argument("--trusted-keys", metavar="DIR", help="public keys (.pub.pem) allowed to sign updates")
    run.add_argument("--allow-unsigned", action="store_true", help="development only: accept unsigned updates")
    tg = sub.add_parser("targets", help="list the target device profiles")
    tg.add_argument("--json", action="store_true")
    i = sub.add_parser("inspect", help="show a bundle's artifacts and validation")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true")
    v = sub.add_parser("verify", help="check every file of a bundle against its sha256")
    v.add_argument("bundle")
    a = sub.add_parser("archive", help="pack a bundle into one .tar.gz")
    a.add_argument("bundle")
    a.add_argument("--out")
    _add_signing_parsers(sub)
    _add_registry_parsers(sub)  # registry, deploy, rollback (issue 6)
    _add_collector_parsers(sub)  # collector run (issue 5)
    _add_fleet_parsers(sub)  # fleet status, fleet simulate (issue 5)
    _add_distill_parsers(sub)  # knowledge distillation (issue 7)
    _add_prune_parsers(sub)  # pruning (issue 7)
    return p


@contextlib.contextmanager
def _stdout_to_stderr(active: bool) -> Iterator[None]:
    """With --json, stdout carries only the JSON: route everything else written to fd 1 (Python prints and
    native libraries' progress output alike) to stderr while the work runs."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _version() -> str:
    from edge_sdk import __version__

    return __version__


def _tolerances(items: list[str]) -> dict:
    from dataclasses import replace

    from edge_sdk.converters.validate import DEFAULT_TOLERANCES
    from edge_sdk.formats import Precision

    out = dict(DEFAULT_TOLERANCES)
    for item in items:
        try:
            prec, _, kv = item.partition(":")
            key, _, value = kv.partition("=")
            p = Precision.parse(prec)
            out[p] = replace(out[p], **{key: None if value.lower() == "none" else float(value)})
        except (ValueError, TypeError):
            raise EdgeSDKError(f"--tolerance {item!r} must look like int8:min_cosine=0.9 (keys: min_cosine, "
                               "max_rel_error, min_top1_agreement, min_top1_agreement_confident, "
                               "min_top5_containment)") from None
    return out


def _common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from edge_sdk.preprocessing import Preprocessing

    pre = None
    if args.preset == "imagenet":
        pre = Preprocessing.imagenet()
    elif args.resize or args.layout:
        pre = Preprocessing(size=args.resize, color=args.color, layout=args.layout or "NCHW", scale=args.scale,
                            mean=args.mean, std=args.std, resize_mode=args.resize_mode)
    return dict(val=args.val, val_labels=args.val_labels, labels=args.labels,
                input_shape=_shape_spec(args.input_shape),
                input_dtypes=_named_values(args.input_dtype, "--input-dtype"),
                dynamic=args.dynamic, custom_objects=args.custom_objects, route=args.route,
                model_class=args.model_class, framework=args.framework, name=args.name, version=args.model_version,
                task=args.task, preprocessing=pre, tolerances=_tolerances(args.tolerance),
                keep_failed=args.keep_failed, overwrite=args.overwrite, quiet=args.json)


def _explicit_options(args: argparse.Namespace) -> dict[str, Any]:
    """Per-target options the user gave on the command line (those override a target profile)."""
    pairs = (("ort_target_platform", args.ort_platform), ("coreml_minimum_deployment_target", args.coreml_target))
    return {k: v for k, v in pairs if v is not None}


def _options(args: argparse.Namespace) -> Any:
    from edge_sdk.converters.base import ConvertOptions

    return ConvertOptions(calib_limit=args.calib_limit, onnx_opset=args.opset,
                          onnx_activation_type=args.onnx_activations, coreml_palette_bits=args.palette_bits,
                          tflite_int8_io=not args.float_io, **_explicit_options(args))


def _budget(args: argparse.Namespace) -> Any:
    """The accuracy budget given on the command line, or None (no fallback ladder)."""
    if args.max_accuracy_drop is None and args.min_agreement is None and args.min_cosine is None:
        return None
    from edge_sdk.converters.accuracy_budget import AccuracyBudget

    return AccuracyBudget(args.max_accuracy_drop, args.min_agreement, args.min_cosine)


def _cmd_convert(args: argparse.Namespace) -> int:
    from edge_sdk.converters.pipeline import convert

    try:
        with _stdout_to_stderr(args.json):
            bundle = convert(args.source, out=args.out, to=args.to, precision=args.precision, calib=args.calib,
                             options=_options(args), ort=not args.no_ort, budget=_budget(args),
                             **_common_kwargs(args))
    except ValidationError as exc:
        bundle = getattr(exc, "bundle", None)
        if args.json:
            _print_json(bundle, getattr(exc, "results", []), str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(bundle, getattr(bundle, "results", []), None)
    else:
        print(f"bundle written: {bundle.root} ({len(bundle.artifacts)} artifacts)", file=sys.stderr)
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from edge_sdk.converters.build import build
    from edge_sdk.targets.profiles import load_profile

    options = replace(_options(args), **{**load_profile(args.target).convert_options(), **_explicit_options(args)})
    with _stdout_to_stderr(args.json):
        bundle = build(args.source, target=args.target, out=args.out, calib=args.calib, options=options,
                       max_accuracy_drop=args.max_accuracy_drop, runs=args.runs, min_agreement=args.min_agreement,
                       min_cosine=args.min_cosine, **_common_kwargs(args))
    info = bundle.manifest.extra["build"]
    if args.json:
        print(json.dumps({"bundle": str(bundle.root), **info}, indent=2))
    else:
        print(f"bundle written: {bundle.root}; selected {info['selected']} for {info['target']}", file=sys.stderr)
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from edge_sdk.benchmark import benchmark_bundle, store_in_manifest
    from edge_sdk.bundle import Bundle

    try:
        threads = tuple(int(t) for t in args.threads.split(","))
    except ValueError:
        raise EdgeSDKError(f"--threads {args.threads!r} must be integers like 1,2") from None
    bundle = Bundle.load(args.bundle)
    with _stdout_to_stderr(args.json):
        report = benchmark_bundle(bundle, runs=args.runs, warmup=args.warmup, threads=threads)
    if args.plot:
        report.plot(args.plot)
    if args.store:
        store_in_manifest(bundle, report)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif has_module("rich"):
        from rich.console import Console

        Console().print(report.table())
    else:  # a device install without the host extras: plain text
        print(report.markdown())
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from edge_sdk.bundle import Bundle
    from edge_sdk.targets import check_bundle, load_profile

    reports = check_bundle(load_profile(args.target), Bundle.load(args.bundle))
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for r in reports:
            print(r.summary())
            for issue in r.warnings:
                print(f"  note ({issue.check}): {issue.message}")
    return 0 if any(r.ok for r in reports) else 1


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    try:
        if not sep or not host:
            raise ValueError
        return host.strip("[]"), int(port)
    except ValueError:
        raise EdgeSDKError(f"--http {text!r} must look like 127.0.0.1:8080") from None


def _cmd_agent(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.device_agent.config import AgentConfig, load_config

    if args.agent_command != "run":
        raise EdgeSDKError("usage: edge-sdk agent run --bundle DIR [--config agent.toml] [--http HOST:PORT] "
                           "[--source camera:0|folder:PATH|file:PATH]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(args.config) if args.config else AgentConfig()
    host, port = _host_port(args.http) if args.http else (None, None)
    order = args.runtime.split(",") if args.runtime else None
    if order is None and args.target:
        from edge_sdk.targets import load_profile

        order = list(load_profile(args.target).runtimes)
    cfg = cfg.merged(bundle=args.bundle, source=args.source, artifact=args.artifact, threads=args.threads,
                     runtime_order=order, host=host, port=port,
                     verify=False if args.no_verify else None)
    cfg = cfg.with_telemetry(fleet=args.fleet, device=args.device, mqtt_url=args.mqtt, window_s=args.window,
                             outbox=args.outbox)
    stop, restart = threading.Event(), threading.Event()
    updater = _open_model_store(args, cfg, lambda _path: (restart.set(), stop.set())) if args.store else None
    if updater is not None:
        cfg = cfg.merged(bundle=str(updater.current_bundle()))
    if not cfg.bundle:
        raise EdgeSDKError("no bundle: pass --bundle DIR or set `bundle` in the config file")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    settings = cfg.telemetry_settings()
    try:
        agent = Agent(cfg.bundle, runtime_order=cfg.runtime_order, artifact=cfg.artifact, threads=cfg.threads,
                      verify=cfg.verify, top_k=cfg.top_k)
    except EdgeSDKError as exc:
        if updater is None or updater.store.link("previous") is None:
            raise
        print(f"agent: the current model does not start ({exc}); rolling back", file=sys.stderr)
        updater.on_switch = None
        agent = Agent(updater.rollback(reason=str(exc)), runtime_order=cfg.runtime_order, artifact=cfg.artifact,
                      threads=cfg.threads, verify=cfg.verify, top_k=cfg.top_k)
    server = None
    reporting: tuple[Any, Any, Any] | None = None
    try:
        print(f"agent: {agent.model_version} on {agent.artifact.key} with {agent.runtime_name} "
              f"({agent.selection_reason})", file=sys.stderr)
        if settings.enabled:
            reporting = _start_agent_telemetry(agent, settings,
                                               on_command=updater.on_command if updater is not None else None)
            if updater is not None:
                updater.emit_event = reporting[0].emit_event
        if args.http or not cfg.source:
            from edge_sdk.device_agent.server import AgentServer

            server = AgentServer(agent, cfg.host, cfg.port, queue_size=cfg.queue_size,
                                 max_body_bytes=cfg.max_body_bytes)
            server.start()
            print(f"agent: serving {server.url} (POST /predict, GET /healthz /metrics /ping)", file=sys.stderr)
        if cfg.source:
            from edge_sdk.device_agent.inputs import run_source

            def emit(name: str, pred: Any) -> None:
                print(json.dumps({"source": name, **pred.to_json()}), flush=True)

            run_source(agent, cfg.source, emit, stop_event=stop)
            if server is None:
                return 0
        stop.wait()
        return 0
    finally:
        if updater is not None:
            updater.close()
        if server is not None:
            server.shutdown()
        if reporting is not None:
            _stop_agent_telemetry(*reporting)
        agent.close()
        if restart.is_set():  # an update switched the model: start again on it (same arguments)
            print("agent: model switched; restarting on it", file=sys.stderr)
            sys.stdout.flush()
            os.execv(sys.executable, [sys.executable, "-m", "edge_sdk.cli", *sys.argv[1:]])


def _open_model_store(args: argparse.Namespace, cfg: Any, on_switch: Any) -> Any:
    """Recover the model store (crash-safe), install --bundle into it when it is empty, return the Updater."""
    from edge_sdk.device_agent.updater import Updater

    updater = Updater(args.store, trusted_keys=args.trusted_keys, allow_unsigned=args.allow_unsigned,
                      runtime_order=cfg.runtime_order, artifact=cfg.artifact, threads=cfg.threads)
    res = updater.recover()
    print(f"agent: model store {args.store}: {res.reason}", file=sys.stderr)
    if res.version is None:
        if not cfg.bundle:
            raise EdgeSDKError(f"the model store {args.store} holds no verified model: pass --bundle ARCHIVE once "
                               "to install the first one")
        updater.update(cfg.bundle)  # the first install passes the same signature and smoke checks as an update
    updater.on_switch = on_switch
    return updater


# -- agent run: telemetry wiring (outbox + MQTT publisher + window thread) --
def _start_agent_telemetry(agent: Any, settings: Any, on_command: Any = None) -> tuple[Any, Any, Any]:
    """Open the outbox, start the publisher (when a broker is configured) and the window thread; emit model.loaded."""
    from edge_sdk.device_agent.outbox import Outbox
    from edge_sdk.device_agent.telemetry import Telemetry, model_info

    outbox = Outbox(settings.outbox_path)
    publisher = None
    try:
        if settings.mqtt is not None:
            from edge_sdk.device_agent.mqtt_publisher import Publisher

            publisher = Publisher(settings.mqtt, outbox, model=model_info(agent), window_s=settings.window_s,
                                  on_command=on_command)
            publisher.start()
        telemetry = Telemetry.for_agent(agent, settings, outbox=outbox, publisher=publisher)
        telemetry.emit_event("model.loaded", {**model_info(agent), "runtime_version": agent.runtime_version,
                                              "reason": agent.selection_reason[:500]})
        telemetry.start()
    except BaseException:
        if publisher is not None:
            publisher.stop()
        outbox.close()
        raise
    where = (f"MQTT {settings.mqtt.url} as {settings.fleet}/{settings.device}" if publisher is not None
             else "the outbox only (no broker configured: pass --mqtt or set [mqtt] url)")
    print(f"agent: telemetry every {settings.window_s:g} s to {where}; outbox {settings.outbox_path}", file=sys.stderr)
    return telemetry, publisher, outbox


def _stop_agent_telemetry(telemetry: Any, publisher: Any, outbox: Any) -> None:
    """Emit the final window, give the publisher a moment to deliver it, publish 'offline' and close the outbox."""
    failed = None
    try:
        telemetry.stop()
    except EdgeSDKError as exc:  # the outbox could not store the last window: report it, still shut down cleanly
        failed = exc
    if publisher is not None:
        if publisher.connected:
            publisher.flush(3.0)
        publisher.stop()
    outbox.close()
    if failed is not None:
        print(f"error: the last telemetry window was not stored: {failed}", file=sys.stderr)
# -- end of agent run telemetry wiring --


def _cmd_targets(args: argparse.Namespace) -> int:
    from edge_sdk.targets import format_profiles, list_profiles

    profiles = list_profiles()
    if args.json:
        print(json.dumps([p.to_dict() for p in profiles], indent=2))
    else:
        print(format_profiles(profiles))
    return 0


def _print_json(bundle: Any, results: list, error: str | None) -> None:
    from dataclasses import asdict

    out = {"bundle": str(bundle.root) if bundle else None, "error": error,
           "results": [{**{k: v for k, v in asdict(r).items() if k != "validation"},
                        "validation": asdict(r.validation)} for r in results]}
    if bundle:
        out.update(name=bundle.manifest.name, version=bundle.manifest.version)
    print(json.dumps(out, indent=2))


def _cmd_inspect(args: argparse.Namespace) -> int:
    from edge_sdk.bundle import Bundle
    from edge_sdk.progress import fmt_bytes

    b = Bundle.load(args.bundle)
    if args.json:
        print(json.dumps(b.manifest.to_dict(), indent=2))
        return 0
    m = b.manifest
    print(f"{m.name}:{m.version}  task={m.task}  source={m.source.get('framework')} {m.source.get('file')}")
    for a in m.artifacts:
        v = a.validation
        state = "passed" if v.passed else ("skipped: " + (v.skipped_reason or "") if v.passed is None else "FAILED")
        cos = f"cos={v.cosine:.5f}" if v.cosine is not None else ""
        print(f"  {a.key:<20} {fmt_bytes(a.size_bytes):>10}  {a.path:<32} {cos} {state}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from edge_sdk.bundle import Bundle

    b = Bundle.load(args.bundle)
    b.verify()
    print(f"ok: {len(b.artifacts)} artifacts match their sha256")
    return 0


def _cmd_archive(args: argparse.Namespace) -> int:
    from edge_sdk.bundle import Bundle

    b = Bundle.load(args.bundle)
    b.verify()
    print(b.archive(Path(args.out) if args.out else None))
    return 0


# --- bundle signing (issue 6): `keys new`, `bundle sign`, `bundle verify` -------------------------------------
def _add_signing_parsers(sub: Any) -> None:
    k = sub.add_parser("keys", help="signing keys for bundles")
    ksub = k.add_subparsers(dest="keys_command", metavar="ACTION")
    kn = ksub.add_parser("new", help="make an ed25519 key pair (NAME.key private, NAME.pub.pem for devices)")
    kn.add_argument("--dir", default="keys", help="directory for the key files (default ./keys)")
    kn.add_argument("--name", help="file name stem (default key-<key id>)")
    b = sub.add_parser("bundle", help="sign a bundle or verify its signature")
    bsub = b.add_subparsers(dest="bundle_command", metavar="ACTION")
    bs = bsub.add_parser("sign", help="sign a bundle directory's manifest (again with another key to co-sign)")
    bs.add_argument("bundle")
    bs.add_argument("--key", required=True, help="private key file made by `edge-sdk keys new`")
    bv = bsub.add_parser("verify", help="check a bundle's signature and files against trusted public keys "
                         "(exit 1 when refused)")
    bv.add_argument("bundle", help="bundle directory or .tar.gz")
    bv.add_argument("--keys", required=True, action="append", help="directory of trusted .pem public keys, or "
                    "one key file (repeatable)")


def _cmd_keys(args: argparse.Namespace) -> int:
    from edge_sdk.signing import generate_keypair, load_public_keys

    if args.keys_command != "new":
        raise EdgeSDKError("usage: edge-sdk keys new [--dir DIR] [--name NAME]")
    private, public = generate_keypair(args.dir, args.name)
    kid = next(iter(load_public_keys(public)))
    print(f"key id: {kid}\nprivate key: {private} (keep it secret; sign with --key {private})\n"
          f"public key: {public} (copy it to the devices' trusted keys directory)")
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    from edge_sdk.signing import SignatureError, sign_bundle, verify_bundle

    if args.bundle_command == "sign":
        kid = sign_bundle(args.bundle, args.key)
        print(f"signed {args.bundle} with key {kid}")
        return 0
    if args.bundle_command == "verify":
        try:
            kid = verify_bundle(args.bundle, args.keys)
        except SignatureError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"ok: {args.bundle} is signed by trusted key {kid} and every file matches the manifest")
        return 0
    raise EdgeSDKError("usage: edge-sdk bundle sign BUNDLE --key KEY | edge-sdk bundle verify BUNDLE --keys DIR")
# --- end bundle signing --------------------------------------------------------------------------------------


# --- model registry, staged deploy, rollback (issue 6): `registry ...`, `deploy`, `rollback` ---------------------
def _add_registry_parsers(sub: Any) -> None:
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", default=os.environ.get("EDGE_SDK_DB", "sqlite:///fleet.db"),
                    help="fleet database URL (default $EDGE_SDK_DB or sqlite:///fleet.db)")
    db.add_argument("--store", default=os.environ.get("EDGE_SDK_REGISTRY", "registry"),
                    help="directory of the stored bundle archives (default $EDGE_SDK_REGISTRY or ./registry)")
    mq = argparse.ArgumentParser(add_help=False)
    mq.add_argument("--mqtt", default=os.environ.get("EDGE_SDK_MQTT", "mqtt://127.0.0.1:1883"),
                    help="broker URL, mqtt://[user:pass@]host:port or mqtts://... (default $EDGE_SDK_MQTT or local)")
    r = sub.add_parser("registry", help="model versions: add, list, show, promote (evaluation gate), holdout, serve")
    rsub = r.add_subparsers(dest="registry_command", metavar="ACTION")
    ra = rsub.add_parser("add", parents=[db], help="register a bundle directory or .tar.gz (name/version from its "
                         "manifest)")
    ra.add_argument("bundle")
    ra.add_argument("--trusted-keys", action="append", metavar="DIR|FILE",
                    help="refuse bundles whose signature does not verify against these public keys")
    rl = rsub.add_parser("list", parents=[db], help="registered versions")
    rl.add_argument("name", nargs="?")
    rl.add_argument("--json", action="store_true")
    rs = rsub.add_parser("show", parents=[db], help="one version as JSON: lineage, validation, holdout, transitions")
    rs.add_argument("ref", metavar="NAME[:VERSION]")
    rs.add_argument("--manifest", action="store_true", help="include the full manifest")
    rp = rsub.add_parser("promote", parents=[db], help="evaluation gate against the active version, then canary")
    rp.add_argument("name")
    rp.add_argument("version")
    rp.add_argument("--force", metavar="REASON", help="promote even if the gate refuses (the reason is recorded)")
    rp.add_argument("--tolerance", type=float, default=0.5, metavar="PP",
                    help="accepted accuracy loss against the active version, in percentage points (default 0.5)")
    rh = rsub.add_parser("holdout", parents=[db], help="register the evaluation set of a model name")
    rh.add_argument("name")
    rh.add_argument("file", help=".npz with arrays `inputs` (model input layout) and `labels` (class indices)")
    rv = rsub.add_parser("serve", parents=[db], help="serve archives at /bundles/NAME/VERSION.tar.gz (HTTP ranges)")
    rv.add_argument("--http", default="127.0.0.1:8081", metavar="HOST:PORT")
    d = sub.add_parser("deploy", parents=[db, mq], help="staged rollout of a promoted version to a fleet over MQTT")
    d.add_argument("name")
    d.add_argument("version")
    d.add_argument("--fleet", required=True)
    d.add_argument("--stages", default="5,25,100", help="cumulative percentages (default 5,25,100)")
    d.add_argument("--hold", default="10m", help="time per stage before it is judged: 30s, 10m, 1h (default 10m)")
    d.add_argument("--devices", help="deploy to these devices only (comma-separated) instead of the fleet's")
    d.add_argument("--base-url", default=os.environ.get("EDGE_SDK_BUNDLE_URL"),
                   help="where devices download bundles: http://COLLECTOR:PORT (archives under /bundles/) or a "
                        "template with {name} and {version} (default $EDGE_SDK_BUNDLE_URL)")
    d.add_argument("--follow", action="store_true", help="judge the deployment here until it ends (instead of "
                   "leaving it to the collector)")
    d.add_argument("--tick", type=float, default=5.0, metavar="S", help="--follow: seconds between checks")
    rb = sub.add_parser("rollback", parents=[db, mq], help="roll back the latest deployment of a model in a fleet")
    rb.add_argument("name")
    rb.add_argument("--fleet", required=True)
    rb.add_argument("--reason", default="rolled back by hand")


def _cmd_registry(args: argparse.Namespace) -> int:
    from edge_sdk.fleet.db import Database
    from edge_sdk.fleet.lifecycle.registry import Registry, parse_model_ref
    from edge_sdk.progress import fmt_bytes

    action = args.registry_command
    if action is None:
        raise EdgeSDKError("usage: edge-sdk registry add|list|show|promote|holdout|serve ... (see --help)")
    with Database.connect(args.db) as db:
        db.migrate()
        reg = Registry(db, args.store, trusted_keys=getattr(args, "trusted_keys", None))
        if action == "add":
            rec = reg.add(args.bundle)
            signed = f", signed by {rec.signed_key_id}" if rec.signed_key_id else ", unsigned"
            print(f"{rec.ref}: {rec.state}, {fmt_bytes(rec.size_bytes)}, sha256 {rec.bundle_sha256}{signed} "
                  f"({rec.archive_path})")
        elif action == "list":
            recs = reg.list(args.name)
            if not recs and not args.json:
                print("no model versions registered: add one with `edge-sdk registry add BUNDLE`", file=sys.stderr)
            if args.json:
                print(json.dumps([r.to_dict() for r in recs], indent=2))
            for r in [] if args.json else recs:
                acc = (r.holdout_result or {}).get("accuracy")
                print(f"{r.name:<24} {r.version:<12} {r.state:<10} {fmt_bytes(r.size_bytes):>10}  "
                      f"{'holdout ' + format(100 * acc, '.2f') + '%' if acc is not None else '':<16} "
                      f"{'signed ' + r.signed_key_id if r.signed_key_id else 'unsigned'}")
        elif action == "show":
            rec = reg.show(*parse_model_ref(args.ref))
            hold = reg.holdout(rec.name)
            print(json.dumps({**rec.to_dict(manifest=args.manifest), "holdout": hold.__dict__ if hold else None,
                              "transitions": reg.transitions(rec.name, rec.version)}, indent=2))
        elif action == "promote":
            p = reg.promote(args.name, args.version, force_reason=args.force, tolerance_pp=args.tolerance)
            how = f"FORCED ({args.force}) past a refusing gate" if p.forced else "gate passed"
            print(f"{p.record.ref} promoted to {p.record.state}: {how}: {p.decision.reason}")
        elif action == "holdout":
            h = reg.register_holdout(args.name, args.file)
            print(f"holdout for {h.name}: {h.samples} samples, sha256 {h.sha256}")
        elif action == "serve":
            from edge_sdk.fleet.lifecycle.bundle_server import BundleHTTPServer

            host, port = _host_port(args.http)
            with BundleHTTPServer(reg, host, port) as srv:
                print(f"serving registry archives at {srv.url}/bundles/NAME/VERSION.tar.gz (Ctrl-C stops)",
                      file=sys.stderr)
                import threading

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
        ro = Rollout(db, publish, args.base_url)
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
        dec = Rollout(db, publish).rollback(args.name, args.fleet, reason=args.reason)
        print(f"deployment {dec.deployment_id} rolled back: {dec.reason}")
    return 0
# --- end model registry, staged deploy, rollback ---------------------------------------------------------------


# --- fleet collector (issue 5): `collector run` ---------------------------------------------------------------
def _add_collector_parsers(sub: Any) -> None:
    c = sub.add_parser("collector", help="the fleet collector: MQTT telemetry into a database, gap repair, alerts")
    csub = c.add_subparsers(dest="collector_command", metavar="ACTION")
    run = csub.add_parser("run", help="subscribe to the fleet's telemetry/events/status and store them (SIGTERM stops)")
    run.add_argument("--mqtt", default="mqtt://127.0.0.1:1883", help="broker URL: mqtt://HOST:1883 or mqtts://HOST:8883")
    run.add_argument("--db", default=os.environ.get("EDGE_SDK_DB", "sqlite:///fleet.db"),
                     help="sqlite:///fleet.db (default, or $EDGE_SDK_DB) or postgresql://USER@HOST:5432/DB")
    run.add_argument("--http", metavar="HOST:PORT", help="also serve the dashboard, JSON API and /metrics here")
    run.add_argument("--fleet", default="+", help="only this fleet (default: every fleet)")
    run.add_argument("--rules", help="alert rules TOML overriding the shipped edge_sdk/fleet/collector/alerts.toml")
    run.add_argument("--webhook", help="POST opened/resolved alerts as JSON to this URL")
    run.add_argument("--bundle", action="append", default=[], help="bundle whose manifest baseline the drift rule "
                     "pools windows against (repeatable; registered models are found in the database)")
    run.add_argument("--client-id", help="MQTT client id (fixed, for the persistent session; default "
                     "edge-collector-<hostname>; give each collector on one host its own)")
    run.add_argument("--no-shared", action="store_true", help="plain instead of shared ($share/...) subscriptions")
    run.add_argument("--session-expiry", type=int, default=7 * 24 * 3600, metavar="SECONDS",
                     help="how long the broker keeps this collector's session (and queues its share of a shared "
                     "subscription) while it is down; default 7 days")
    run.add_argument("--protocol", default="auto", choices=["auto", "5", "3.1.1"],
                     help="MQTT version (auto: v5, or 3.1.1 for a broker without v5 such as the embedded one)")
    run.add_argument("--username")
    run.add_argument("--password", help="MQTT password (default $EDGE_SDK_MQTT_PASSWORD)")
    run.add_argument("--ca-file", help="CA certificate that signed the broker's certificate (TLS)")
    run.add_argument("--cert-file", help="client certificate (TLS client authentication)")
    run.add_argument("--key-file", help="private key of --cert-file")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _cmd_collector(args: argparse.Namespace) -> int:
    import logging

    from edge_sdk.bundle import Bundle
    from edge_sdk.fleet.collector.service import Collector

    if args.collector_command != "run":
        raise EdgeSDKError("usage: edge-sdk collector run [--mqtt URL] [--db URL] [--http HOST:PORT] ...")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    baselines = {}
    for path in args.bundle:
        m = Bundle.load(path).manifest
        if not m.baseline:
            raise EdgeSDKError(f"--bundle {path}: the manifest has no baseline: rebuild it with calibration data")
        baselines[(m.name, m.version)] = m.baseline
    host_port = _host_port(args.http) if args.http else None
    col = Collector(args.db, args.mqtt, fleet=args.fleet, client_id=args.client_id, username=args.username,
                    password=args.password or os.environ.get("EDGE_SDK_MQTT_PASSWORD"), ca_file=args.ca_file,
                    cert_file=args.cert_file, key_file=args.key_file, shared=not args.no_shared, rules=args.rules,
                    webhook=args.webhook, baselines=baselines, protocol=args.protocol,
                    session_expiry_s=args.session_expiry)
    http = None
    if host_port is not None:
        from edge_sdk.fleet.dashboard.server import CollectorHTTP  # the dashboard (loaded only when asked for)

        http = CollectorHTTP(col.db, host_port[0], host_port[1], stats=col.stats)
        http.start()
        print(f"dashboard: {http.url}", file=sys.stderr)
    print(f"collector {col.client_id}: {args.mqtt} -> {col.db!r}", file=sys.stderr, flush=True)
    return col.run_forever(on_stop=http.shutdown if http is not None else None)
# --- end fleet collector --------------------------------------------------------------------------------------


# --- fleet operators (issue 5): `fleet status`, `fleet simulate` -----------------------------------------------
def _add_fleet_parsers(sub: Any) -> None:
    f = sub.add_parser("fleet", help="the fleet: status table, simulated devices")
    fsub = f.add_subparsers(dest="fleet_command", metavar="ACTION")
    st = fsub.add_parser("status", help="one line per device: state, model, latency, errors, confidence, drift")
    st.add_argument("--db", default=os.environ.get("EDGE_SDK_DB", "sqlite:///fleet.db"),
                    help="the collector's database (default sqlite:///fleet.db or $EDGE_SDK_DB)")
    st.add_argument("--fleet", help="only this fleet")
    st.add_argument("--since", type=float, default=900, metavar="S", help="aggregate the last S seconds (900)")
    st.add_argument("--json", action="store_true", help="print the rows as JSON")
    sim = fsub.add_parser("simulate", help="N real MQTT device clients sending schema-valid windows")
    sim.add_argument("--devices", type=int, required=True, metavar="N")
    sim.add_argument("--mqtt", default="mqtt://127.0.0.1:1883", metavar="URL")
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
    sim.add_argument("--json", action="store_true", help="print the summary as JSON")


def _cmd_fleet(args: argparse.Namespace) -> int:
    if args.fleet_command == "status":
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
    if args.fleet_command == "simulate":
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
    raise EdgeSDKError("usage: edge-sdk fleet status [--db URL] [--json] | edge-sdk fleet simulate --devices N ...")
# --- end fleet operators ----------------------------------------------------------------------------------------


# --- knowledge distillation (issue 7): `distill` -----------------------------------------------------------------
def _add_distill_parsers(sub: Any) -> None:
    d = sub.add_parser("distill", help="train a small student on a teacher's softened outputs plus the labels")
    d.add_argument("--teacher", required=True, help="teacher state_dict (.pt/.pth)")
    d.add_argument("--teacher-class", required=True, help="pkg.module:Class of the teacher")
    d.add_argument("--student-class", required=True, help="pkg.module:Class of the student (built with no arguments)")
    tr = d.add_mutually_exclusive_group(required=True)
    tr.add_argument("--train", nargs=2, metavar=("X.npy", "Y.npy"), help="training inputs and integer labels")
    tr.add_argument("--train-dir", metavar="DIR", help="training images in one subfolder per class")
    va = d.add_mutually_exclusive_group()
    va.add_argument("--val", nargs=2, metavar=("X.npy", "Y.npy"), help="validation inputs and labels (accuracy)")
    va.add_argument("--val-dir", metavar="DIR", help="validation images in one subfolder per class")
    d.add_argument("--temperature", type=float, default=4.0, help="softening temperature T (default 4)")
    d.add_argument("--alpha", type=float, default=0.7, help="weight of the soft targets, 0..1 (default 0.7)")
    d.add_argument("--epochs", type=int, default=5)
    d.add_argument("--lr", type=float, default=2e-3)
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--baseline", action="store_true", help="also train the student on labels alone and compare")
    d.add_argument("--resize", type=_size, help="HxW for image folders (default: keep the images' size)")
    d.add_argument("--threads", type=int, help="torch intra-op threads (1 is fastest on a busy small machine)")
    d.add_argument("--out", required=True, help="where to write the student's state_dict (.pt)")
    d.add_argument("--json", action="store_true", help="print the report as JSON")


def _cmd_distill(args: argparse.Namespace) -> int:
    import numpy as np

    from edge_sdk._deps import require
    from edge_sdk.errors import CalibrationError, SourceModelError
    from edge_sdk.optimize.distill import distill, import_class

    torch = require("torch", "torch", "knowledge distillation")
    teacher = import_class(args.teacher_class)()
    try:
        teacher.load_state_dict(torch.load(args.teacher, map_location="cpu", weights_only=True), strict=True)
    except (OSError, RuntimeError, TypeError, AttributeError) as exc:
        raise SourceModelError(f"cannot load {args.teacher} into {args.teacher_class} "
                               f"({str(exc).splitlines()[0][:160]}): give its state_dict and class") from None
    torch.manual_seed(args.seed)  # the student's initial weights depend on the seed too
    student = import_class(args.student_class)()

    def arrays(paths: list[str]) -> tuple[Any, Any]:
        try:
            return np.load(paths[0]), np.load(paths[1])
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"cannot read {paths[0]} / {paths[1]} ({exc}): give two .npy files") from None

    train = arrays(args.train) if args.train else args.train_dir
    val = arrays(args.val) if args.val else args.val_dir
    result = distill(teacher, student, train, val_data=val, temperature=args.temperature, alpha=args.alpha,
                     epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                     baseline=args.baseline, image_size=args.resize, threads=args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result.student.state_dict(), out)
    if args.json:
        print(json.dumps({**result.to_dict(), "out": str(out)}, indent=2))
    else:
        print(result.report())
        print(f"student state_dict written to {out}")
    return 0
# --- end knowledge distillation ----------------------------------------------------------------------------------


# --- pruning (issue 7): `prune` ------------------------------------------------------------------------------------
def _add_prune_parsers(sub: Any) -> None:
    pr = sub.add_parser("prune", help="prune a PyTorch model (structured channels or magnitude), fine-tune, report")
    pr.add_argument("model", help="state_dict (.pt/.pth, with --model-class), or a .pt2 torch.export program")
    pr.add_argument("--model-class", help="pkg.module:Class for a state_dict")
    pr.add_argument("--input-shape", type=_shape, required=True, help="e.g. 1,1,28,28")
    pr.add_argument("--method", choices=("structured", "magnitude"), default="structured",
                    help="structured: remove conv channels (faster on every runtime); magnitude: zero weights")
    pr.add_argument("--amount", type=float, default=0.5, help="fraction of channels / weights to remove (0.5)")
    pr.add_argument("--train", nargs=2, metavar=("X.npy", "Y.npy"), help="fine-tune inputs and integer labels")
    pr.add_argument("--val", nargs=2, metavar=("X.npy", "Y.npy"), help="validation inputs and labels (accuracy)")
    pr.add_argument("--epochs", type=int, default=2, help="fine-tune epochs (default 2)")
    pr.add_argument("--lr", type=float, default=1e-3)
    pr.add_argument("--max-train-samples", type=int, help="fine-tune on at most this many samples per epoch")
    pr.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    pr.add_argument("--out", required=True, help="pruned model: .pt2 (torch.export, recommended) or TorchScript")
    pr.add_argument("--json", action="store_true", help="print the report as JSON")


def _cmd_prune(args: argparse.Namespace) -> int:
    import numpy as np

    from edge_sdk.converters.sources import load_source
    from edge_sdk.errors import CalibrationError
    from edge_sdk.optimize.prune import prune

    def arrays(paths: list[str] | None) -> tuple[Any, Any] | None:
        try:
            return (np.load(paths[0]), np.load(paths[1])) if paths else None
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"cannot read {paths[0]} / {paths[1]} ({exc}): give two .npy files") from None

    src = load_source(args.model, input_shape=args.input_shape, model_class=args.model_class)
    result = prune(src.model, method=args.method, amount=args.amount, example_input=np.zeros(args.input_shape,
                   np.float32), train_data=arrays(args.train), val_data=arrays(args.val), finetune_epochs=args.epochs,
                   lr=args.lr, max_train_samples=args.max_train_samples, threads=args.threads)
    out = result.save(args.out)
    if args.json:
        print(json.dumps({**result.report.to_dict(), "out": str(out)}, indent=2))
    else:
        print(result.report.format())
        print(f"pruned model written to {out} (edge-sdk convert {out} --input-shape "
              f"{','.join(map(str, args.input_shape))} ...)")
    return 0
# --- end pruning ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``edge-sdk``."""
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off the console
    # frameworks' deprecation notices are for their API users, not for someone running a conversion
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"convert": _cmd_convert, "build": _cmd_build, "benchmark": _cmd_benchmark, "targets": _cmd_targets,
                "check": _cmd_check, "agent": _cmd_agent,
                "inspect": _cmd_inspect, "verify": _cmd_verify, "archive": _cmd_archive}
    handlers.update({"keys": _cmd_keys, "bundle": _cmd_bundle})  # bundle signing (issue 6)
    handlers.update({"registry": _cmd_registry, "deploy": _cmd_deploy, "rollback": _cmd_rollback})  # issue 6
    handlers.update({"collector": _cmd_collector})  # fleet collector (issue 5)
    handlers.update({"fleet": _cmd_fleet})  # fleet status, fleet simulate (issue 5)
    handlers.update({"distill": _cmd_distill})  # knowledge distillation (issue 7)
    handlers.update({"prune": _cmd_prune})  # pruning (issue 7)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return handlers[args.command](args)
    except MissingDependencyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (EdgeSDKError, ValueError) as exc:  # ValueError: bad enum names and numeric arguments
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
