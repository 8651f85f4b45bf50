"""Which artifact of a bundle this device runs, and with which runtime: the device's one selection rule.

An explicit ``artifact`` key wins; else the build's selection (``manifest.extra["build"]["selected"]``) when a
runtime installed here runs it and it did not fail validation; else the first artifact of the first installed
runtime in ``runtime_order`` (validated artifacts first). The reason is returned in words for logs and /healthz.
"""

from __future__ import annotations

import logging

from edge_sdk.bundle import Artifact, Bundle
from edge_sdk.errors import BundleError, InferenceError, MissingDependencyError
from edge_sdk.runtimes.base import Runtime
from edge_sdk.runtimes.registry import RUNTIMES, default_order, get_runtime

__all__ = ["check_order", "parse_key", "select_artifact"]

log = logging.getLogger("edge_sdk.agent")


def parse_key(key: str) -> tuple[str, str]:
    """``"onnx/int8"`` -> ("onnx", "int8"); BundleError for anything else."""
    fmt, sep, prec = key.strip().partition("/")
    if not sep or not fmt or not prec:
        raise BundleError(f"artifact {key!r} is not a 'format/precision' key: use e.g. 'onnx/int8'")
    return fmt, prec


def check_order(runtime_order: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The runtime order to use (the registry's default when None/empty); InferenceError for unknown names."""
    order = tuple(runtime_order) if runtime_order else default_order()
    unknown = [r for r in order if r not in RUNTIMES]
    if unknown:
        raise InferenceError(f"unknown runtime(s) {', '.join(unknown)} in runtime_order: choose from "
                             f"{', '.join(RUNTIMES)}")
    return order


def _formats_of(rt: Runtime) -> set[str]:
    return {str(f) for f in rt.formats}


def select_artifact(bundle: Bundle, runtime_order: tuple[str, ...], key: str | None) -> tuple[Artifact, Runtime,
                                                                                             str]:
    """(artifact, runtime, reason) for ``bundle`` on this device (see the module docstring)."""
    arts = bundle.artifacts
    if not arts:
        raise BundleError(f"bundle {bundle.root} lists no artifacts: rebuild it with `edge-sdk convert`")
    installed = [rt for rt in (get_runtime(n) for n in runtime_order) if rt.is_available()]
    if key:
        a = bundle.artifact(*parse_key(key))
        rt = next((r for r in installed if a.format in _formats_of(r)), None)
        if rt is None:
            _missing_runtime_for(a, runtime_order)
        return a, rt, f"artifact {a.key} requested explicitly"
    build = bundle.manifest.extra.get("build")
    build = build if isinstance(build, dict) else {}
    chosen = build.get("selected")
    if chosen:
        try:
            a = bundle.artifact(*parse_key(str(chosen)))
        except BundleError:
            log.warning("the build selected %s but the bundle has no such artifact; choosing by runtime order",
                        chosen)
        else:
            rt = next((r for r in installed if a.format in _formats_of(r)), None)
            if rt is not None and a.validation.passed is not False:
                target = build.get("target")
                return a, rt, f"selected by the build{f' for target {target}' if target else ''}"
            log.info("the build selected %s but it cannot run here (no installed runtime for it, or it failed "
                     "validation); choosing by runtime order", chosen)
    for rt in installed:
        cands = [a for a in arts if a.format in _formats_of(rt) and a.validation.passed is not False]
        if cands:
            cands.sort(key=lambda a: a.validation.passed is not True)  # validated first, stable otherwise
            a = cands[0]
            skipped = runtime_order[: runtime_order.index(rt.name)]
            why = f"{rt.name} is the first runtime in order {list(runtime_order)} that is installed here " \
                  f"and runs an artifact of this bundle"
            if skipped:
                why += f" (before it: {', '.join(skipped)} not installed or no artifact)"
            return a, rt, why + f"; {a.key} is its first {'validated ' if a.validation.passed else ''}artifact"
    have = ", ".join(a.key for a in arts)
    names = ", ".join(r.name for r in installed) or "none"
    needed = sorted({rt.extra for rt in RUNTIMES.values() for a in arts if a.format in _formats_of(rt)})
    raise InferenceError(f"no installed runtime (installed of {list(runtime_order)}: {names}) runs any "
                         f"artifact of this bundle ({have}): pip install one of "
                         + ", ".join(f'"edge-sdk[agent,{e}]"' for e in needed))


def _missing_runtime_for(a: Artifact, runtime_order: tuple[str, ...]) -> None:
    for name in runtime_order:
        rt = get_runtime(name)
        if a.format in _formats_of(rt):
            raise MissingDependencyError(name, rt.extra, f"running the {a.key} artifact")
    raise InferenceError(f"no runtime in runtime_order {list(runtime_order)} runs {a.format} artifacts: "
                         "add one that does")
