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
        c.add_argument("--precision", default="fp32", help="fp32,fp16,dynamic,int8,palettized")
    c.add_argument("--calib", help="calibration data: .npy/.npz of ready tensors or an image folder")
    c.add_argument("--out", required=True, help="bundle directory to create")
    c.add_argument("--input-shape", type=_shape, help="e.g. 1,3,224,224 (needed for state_dict/TorchScript)")
    c.add_argument("--model-class", help="pkg.module:Class for state_dict sources")
    c.add_argument("--framework", choices=["pytorch", "keras", "onnx"], help="override framework detection")
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
    return dict(val=args.val, val_labels=args.val_labels, labels=args.labels, input_shape=args.input_shape,
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


def _cmd_convert(args: argparse.Namespace) -> int:
    from edge_sdk.converters.pipeline import convert

    try:
        with _stdout_to_stderr(args.json):
            bundle = convert(args.source, out=args.out, to=args.to, precision=args.precision, calib=args.calib,
                             options=_options(args), ort=not args.no_ort, **_common_kwargs(args))
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
                       max_accuracy_drop=args.max_accuracy_drop, runs=args.runs, **_common_kwargs(args))
    info = bundle.manifest.extra["build"]
    if args.json:
        print(json.dumps({"bundle": str(bundle.root), **info}, indent=2))
    else:
        print(f"bundle written: {bundle.root}; selected {info['selected']} for {info['target']}", file=sys.stderr)
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from edge_sdk.bundle import Bundle
    from edge_sdk.device_agent.benchmark import benchmark_bundle, store_in_manifest

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
    if not cfg.bundle:
        raise EdgeSDKError("no bundle: pass --bundle DIR or set `bundle` in the config file")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent = Agent(cfg.bundle, runtime_order=cfg.runtime_order, artifact=cfg.artifact, threads=cfg.threads,
                  verify=cfg.verify, top_k=cfg.top_k)
    server = None
    try:
        print(f"agent: {agent.model_version} on {agent.artifact.key} with {agent.runtime_name} "
              f"({agent.selection_reason})", file=sys.stderr)
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
        if server is not None:
            server.shutdown()
        agent.close()


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
