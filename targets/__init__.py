"""Target device profiles (TOML data files in ``profiles/``) and compatibility checks of bundle artifacts.

    >>> from edge_sdk.targets import load_profile, check_bundle
    >>> profile = load_profile("coral-edgetpu")
    >>> [r.summary() for r in check_bundle(profile, Bundle.load("bundle/"))]

Users add profiles without touching code: put ``NAME.toml`` in a directory listed in ``$EDGE_SDK_TARGETS``
(see :mod:`edge_sdk.targets.profiles` for the file layout and the search path).
"""

from __future__ import annotations

from collections.abc import Iterable

from edge_sdk.targets.compat import (
    CompatIssue,
    CompatReport,
    check_artifact,
    check_bundle,
    coreml_spec_version,
    read_required_operators,
    tflite_graph,
)
from edge_sdk.targets.profiles import (
    ENV_VAR,
    AccuracyBudget,
    Candidate,
    Constraints,
    TargetProfile,
    TargetProfileError,
    list_profiles,
    load_profile,
    profile_paths,
)

__all__ = [
    "ENV_VAR",
    "AccuracyBudget",
    "Candidate",
    "CompatIssue",
    "CompatReport",
    "Constraints",
    "TargetProfile",
    "TargetProfileError",
    "check_artifact",
    "check_bundle",
    "coreml_spec_version",
    "format_profiles",
    "list_profiles",
    "load_profile",
    "profile_paths",
    "read_required_operators",
    "tflite_graph",
]


def _constraints_text(p: TargetProfile) -> str:
    c = p.constraints
    parts = (["int8 I/O"] if c.int8_io_required else []) + (["static shapes"] if c.static_shapes else [])
    parts += [f"ops={c.supported_ops}"] if c.supported_ops else []
    parts += [f"<={c.max_model_size_mb:g} MiB"] if c.max_model_size_mb else []
    parts += [f"min OS {c.min_os}"] if c.min_os else []
    return ", ".join(parts) or "-"


def format_profiles(profiles: Iterable[TargetProfile]) -> str:
    """A plain-text table of profiles for ``edge-sdk targets``: one row each, candidates in preference order."""
    header = ("TARGET", "ARCH", "CANDIDATES (preferred first)", "RUNTIMES", "CONSTRAINTS", "BUDGET", "BENCH HERE")
    rows = [header]
    for p in profiles:
        rows.append((
            p.name, p.arch, " > ".join(c.key for c in p.candidates),
            ", ".join(p.runtimes) + (f" [{', '.join(p.delegates)}]" if p.delegates else ""),
            _constraints_text(p),
            f"-{p.accuracy.max_accuracy_drop_pp:g} pp, cos>={p.accuracy.min_cosine:g}",
            "yes" if p.benchmark_on_host else "no",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
