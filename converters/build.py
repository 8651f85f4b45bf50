"""``edge-sdk build SOURCE --target NAME``: convert what a device profile asks for, validate, check
compatibility, and — where this host can stand in for the device — benchmark the candidates and pick
the fastest one that stays within the accuracy budget. The choice and its reason go into the manifest
(``extra.build``). For devices this host cannot stand in for, candidates are recorded as "not
benchmarked on target hardware" and chosen by the profile's preference order: never a faked figure.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_sdk.bundle import Artifact, Bundle
from edge_sdk.converters.base import ConvertOptions
from edge_sdk.converters.pipeline import convert
from edge_sdk.errors import EdgeSDKError, ValidationError
from edge_sdk.progress import Reporter

__all__ = ["Candidate", "build", "select_for_target", "within_budget"]

# two variants closer than this in p50 latency count as a tie; ties go to the profile's preference order,
# so a noisy machine does not flip the selection from run to run
TIE_FRACTION = 0.10


@dataclass
class Candidate:
    """One artifact considered by the build, with every reason for or against it."""

    key: str
    preference: int
    compatible: bool = True
    within_budget: bool = True
    p50_ms: float | None = None
    fp32_p50_ms: float | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def eligible(self) -> bool:
        return self.compatible and self.within_budget


def within_budget(artifact: Artifact, max_drop_pp: float, min_cosine: float | None) -> tuple[bool, str]:
    """Is the artifact inside the accuracy budget? Uses measured accuracy when labels were given,
    otherwise top-1 disagreement with the source (an upper bound on the accuracy drop), otherwise cosine."""
    v = artifact.validation
    if v.passed is False:
        return False, "failed validation: " + "; ".join(v.failures)
    if v.passed is None:
        return True, f"not validated numerically here ({v.skipped_reason}); accepted on its spec checks"
    if v.accuracy is not None and v.source_accuracy is not None:
        drop = 100 * (v.source_accuracy - v.accuracy)
        return drop <= max_drop_pp, f"accuracy drop {drop:.2f} pp (budget {max_drop_pp:g} pp)"
    if v.top1_agreement_confident is not None:
        # without labels: disagreement where the source is confident (softmax >= 0.5) estimates the accuracy
        # drop; ambiguous inputs flip between near-tied classes without making the model worse
        dis = 100 * (1 - v.top1_agreement_confident)
        n = v.checks.get("confident_samples", "?")
        return dis <= max_drop_pp, (f"top-1 disagreement {dis:.2f}% on the {n} inputs where the source is confident "
                                    f"(no labels; budget {max_drop_pp:g} pp — pass --val-labels for accuracy)")
    if v.top1_agreement is not None:
        dis = 100 * (1 - v.top1_agreement)
        return dis <= max_drop_pp, (f"top-1 disagreement with the source {dis:.2f}% bounds the accuracy drop "
                                    f"(budget {max_drop_pp:g} pp)")
    if min_cosine is not None and v.cosine is not None:
        return v.cosine >= min_cosine, f"cosine {v.cosine:.5f} (budget >= {min_cosine:g})"
    return True, "no accuracy figure available; passed validation"


def build(source: Any, *, target: str, out: str | Path, calib: Any = None, max_accuracy_drop: float | None = None,
          runs: int = 50, warmup: int = 10, rounds: int = 3, quiet: bool = False, min_agreement: float | None = None,
          min_cosine: float | None = None, version_code: int | None = None, fleets: list[str] | None = None,
          qat_epochs: int | None = None, **convert_kwargs: Any) -> Bundle:
    """Build a bundle for a named target profile and record the selected variant in the manifest.

    An explicit ``max_accuracy_drop``, ``min_agreement`` or ``min_cosine`` also turns on the int8 fallback
    ladder (converters/accuracy_budget.py; ``qat_epochs``: its fine-tuning rung for PyTorch sources); the profile's
    own budget only drives the selection.
    ``version_code`` / ``fleets``: the signed model identity written into the manifest (see ``convert``).
    """
    from edge_sdk.targets.profiles import load_profile

    profile = load_profile(target)
    budget = profile.accuracy.max_accuracy_drop_pp if max_accuracy_drop is None else float(max_accuracy_drop)
    if budget < 0:
        raise EdgeSDKError(f"--max-accuracy-drop {budget} must be >= 0 percentage points")
    options = convert_kwargs.pop("options", None) or ConvertOptions(**profile.convert_options())
    variants = [(c.format, c.precision) for c in profile.candidates]
    ladder_budget = None
    if max_accuracy_drop is not None or min_agreement is not None or min_cosine is not None:
        from edge_sdk.converters.accuracy_budget import AccuracyBudget

        ladder_budget = AccuracyBudget(max_accuracy_drop, min_agreement, min_cosine,
                                       **({} if qat_epochs is None else {"qat_epochs": qat_epochs}))
    try:
        bundle = convert(source, out=out, calib=calib, variants=variants, options=options, quiet=quiet,
                         skip_unsupported=True, budget=ladder_budget, version_code=version_code, fleets=fleets,
                         **convert_kwargs)
    except ValidationError as exc:  # failed artifacts were left out; build with the rest
        bundle = getattr(exc, "bundle", None)
        if bundle is None:
            raise
    return select_for_target(bundle, profile, budget, runs=runs, warmup=warmup, rounds=rounds, quiet=quiet)


def select_for_target(bundle: Bundle, profile: Any, budget: float, *, runs: int = 50, warmup: int = 10,
                      rounds: int = 3, quiet: bool = False) -> Bundle:
    """Check every artifact against the profile, benchmark where this host can stand in for the target,
    select, and record the selection in ``manifest.extra["build"]`` (saved)."""
    from edge_sdk.targets.compat import check_artifact

    report = Reporter(quiet=quiet)
    order = {f"{c.format.value}/{c.precision.value}": i for i, c in enumerate(profile.candidates)}
    cands: list[Candidate] = []
    compiled_any = False
    for a in bundle.artifacts:
        c = Candidate(a.key, order.get(a.key, len(order)))
        edgetpu_out = _edgetpu_workdir(profile, bundle, a)
        comp = check_artifact(profile, bundle, a, edgetpu_out=edgetpu_out)
        if edgetpu_out is not None:
            compiled_any |= _ship_edgetpu(bundle, a, comp.details.get("edgetpu") or {}, edgetpu_out)
        c.compatible = comp.ok
        c.reasons += [f"incompatible ({i.check}): {i.message}" for i in comp.errors]
        c.reasons += [f"note ({i.check}): {i.message}" for i in comp.warnings]
        ok, why = within_budget(a, budget, profile.accuracy.min_cosine)
        c.within_budget = ok
        c.reasons.append(why if ok else f"over budget: {why}")
        cands.append(c)
    selection: dict[str, Any]
    if profile.benchmark_on_host:
        from edge_sdk.benchmark import benchmark_bundle, store_in_manifest

        threads = profile.threads or 1
        with report.step(f"benchmarking {len(cands)} candidates ({rounds} rounds x {runs} runs, {threads} thread)"):
            bench = benchmark_bundle(bundle, runs=runs, warmup=warmup, threads=(threads,), rounds=rounds)
        store_in_manifest(bundle, bench)
        p50 = {r.key: r.p50_ms for r in bench.results if r.status == "ok"}
        for c in cands:
            c.p50_ms = p50.get(c.key)
            c.fp32_p50_ms = p50.get(c.key.split("/")[0] + "/fp32")
            if c.p50_ms is None:
                c.compatible = False
                c.reasons.append("not benchmarked here: " + next(
                    (r.reason for r in bench.results if r.key == c.key), "no result"))
        selection = _select_fastest(cands)
    else:
        for c in cands:
            c.reasons.append("not benchmarked on target hardware")
        selection = _select_by_preference(cands, profile.name)
    if compiled_any:  # the Edge TPU files are recorded on their artifacts before the benchmark reloads the bundle
        bundle.save()
    bundle = Bundle.load(bundle.root)  # the benchmark stored its results in the manifest
    bundle.manifest.extra["build"] = {
        "target": profile.name, "profile": profile.to_dict(), "max_accuracy_drop_pp": budget,
        "benchmarked_on_host": profile.benchmark_on_host, "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **selection, "candidates": [asdict(c) | {"eligible": c.eligible} for c in sorted(cands, key=_pref)],
    }
    bundle.save()
    if not quiet:
        _print_selection(bundle.manifest.extra["build"])
    return bundle


def _edgetpu_workdir(profile: Any, bundle: Bundle, artifact: Artifact) -> Path | None:
    """Where ``edgetpu_compiler`` writes for ``artifact`` (kept, to ship), or None when it will not run."""
    if artifact.format != "tflite" or artifact.precision != "int8" or profile.constraints.supported_ops != "edgetpu" \
            or shutil.which("edgetpu_compiler") is None:
        return None
    return Path(tempfile.mkdtemp(prefix="edgetpu_", dir=bundle.root))


def _ship_edgetpu(bundle: Bundle, artifact: Artifact, details: dict[str, Any], workdir: Path) -> bool:
    """Keep the compiled ``_edgetpu.tflite`` in the bundle (issue 16); True when one was shipped."""
    from edge_sdk.targets.edgetpu_ops import attach_compiled

    try:
        compiled = details.get("compiled")
        if not compiled or not Path(compiled).is_file():
            return False
        attach_compiled(bundle, artifact, Path(compiled), details)
        return True
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _pref(c: Candidate) -> tuple[int, str]:
    return c.preference, c.key


def _select_fastest(cands: list[Candidate]) -> dict[str, Any]:
    ok = [c for c in cands if c.eligible and c.p50_ms is not None]
    if not ok:
        raise EdgeSDKError("no candidate is both compatible with the target and within the accuracy budget: "
                           "see the candidates' reasons with --json, or raise --max-accuracy-drop")
    fastest = min(c.p50_ms for c in ok)  # type: ignore[type-var]
    tied = [c for c in ok if c.p50_ms <= fastest * (1 + TIE_FRACTION)]  # type: ignore[operator]
    chosen = min(tied, key=_pref)
    reason = f"fastest eligible variant: p50 {chosen.p50_ms:.3f} ms"
    if len(tied) > 1:
        reason += (f" (within {int(TIE_FRACTION * 100)}% of " + ", ".join(c.key for c in tied if c is not chosen)
                   + "; tie broken by the profile's preference order)")
    if chosen.fp32_p50_ms:
        ratio = chosen.p50_ms / chosen.fp32_p50_ms  # type: ignore[operator]
        reason += f"; {ratio:.2f}x the p50 of {chosen.key.split('/')[0]}/fp32"
        if ratio > 1:
            reason += " — SLOWER than fp32 of its format: every faster variant is incompatible or over budget"
    return {"selected": chosen.key, "reason": reason, "p50_ms": chosen.p50_ms}


def _select_by_preference(cands: list[Candidate], target: str) -> dict[str, Any]:
    ok = sorted((c for c in cands if c.eligible), key=_pref)
    if not ok:
        raise EdgeSDKError(f"no candidate is compatible with {target} and within the accuracy budget: see the "
                           "candidates' reasons with --json, or raise --max-accuracy-drop")
    return {"selected": ok[0].key, "p50_ms": None,
            "reason": f"first eligible variant in the {target} profile's preference order; not benchmarked on "
                      "target hardware (this host cannot stand in for it): benchmark on the device with "
                      "`edge-sdk benchmark`"}


def _print_selection(info: dict[str, Any]) -> None:
    from rich.table import Table

    from edge_sdk.progress import stderr_console

    t = Table(title=f"candidates for {info['target']}")
    for col in ("artifact", "p50 ms", "vs fp32", "compatible", "in budget", "reasons"):
        t.add_column(col)
    for c in info["candidates"]:
        ratio = f"{c['p50_ms'] / c['fp32_p50_ms']:.2f}x" if c["p50_ms"] and c["fp32_p50_ms"] else "-"
        mark = "→ " if c["key"] == info["selected"] else ""
        t.add_row(mark + c["key"], f"{c['p50_ms']:.3f}" if c["p50_ms"] else "-", ratio,
                  "yes" if c["compatible"] else "no", "yes" if c["within_budget"] else "no",
                  "; ".join(c["reasons"])[:160])
    con = stderr_console()
    con.print(t)
    con.print(f"selected [bold]{info['selected']}[/bold]: {info['reason']}")
