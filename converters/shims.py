"""Workarounds ("shims") for known bugs in the vendor conversion tools, kept in one place.

Each shim names the upstream issue it works around and the tool versions that have the bug; it is
applied only when the installed versions fall in that range, so upgrading the tool past the fix turns
the shim off without a code change. Every shim has a test (``tests/test_shims.py``) that runs the
failing conversion with the shim disabled and expects the upstream error: when upstream fixes the
bug, that test fails and says the shim can be dropped.

``EDGE_SDK_DISABLE_SHIMS=name1,name2`` (or ``all``) turns shims off, to prove a bug is real or to
rule a shim out when a conversion misbehaves. Shims patch the tool in this process only, and
``apply()`` is idempotent: converters call :func:`apply_shims` every time they import the tool.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_sdk._deps import installed_version

__all__ = ["DISABLE_ENV", "SHIMS", "Shim", "applicable", "apply_shims", "disabled_names", "explain",
           "tf_safe_node_names"]

DISABLE_ENV = "EDGE_SDK_DISABLE_SHIMS"


@dataclass(frozen=True)
class Shim:
    """One workaround for one upstream bug.

    ``versions`` is a PEP 440 specifier for the tool's distribution (the releases that have the bug);
    ``requires`` adds other distributions whose versions trigger it (e.g. NumPy >= 2.4), ``""``
    meaning "installed, any version". ``frontends`` says which conversions it affects, so artifact
    notes list only the shims that mattered. ``signature`` is a fragment of the upstream error
    message, so a failure the shim would have prevented can be named (:func:`explain`).
    """

    name: str
    tool: str
    versions: str
    issue: str
    summary: str
    apply: Callable[[], None]
    signature: str
    frontends: tuple[str, ...] = ()
    requires: dict[str, str] = field(default_factory=dict)


def _in_range(version: str, spec: str) -> bool:
    # packaging is a dependency of every tool shimmed here (coremltools requires it)
    from packaging.specifiers import SpecifierSet

    return not spec or SpecifierSet(spec).contains(version, prereleases=True)


def disabled_names() -> set[str]:
    """Shim names turned off by ``EDGE_SDK_DISABLE_SHIMS`` (``{"all"}`` turns every shim off)."""
    raw = os.environ.get(DISABLE_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def applicable(shim: Shim) -> bool:
    """True when the installed tool (and every trigger in ``requires``) is in the shim's version range."""
    version = installed_version(shim.tool)
    if version is None or not _in_range(version, shim.versions):
        return False
    for dist, spec in shim.requires.items():
        have = installed_version(dist)
        if have is None or not _in_range(have, spec):
            return False
    return True


def apply_shims(tool: str, *, frontend: str | None = None) -> list[str]:
    """Apply every enabled, in-range shim for ``tool`` (optionally only one frontend's); return their names.

    Already-applied shims are re-applied as no-ops and still reported, so every caller can record
    which workarounds were in effect for its conversion.
    """
    off = disabled_names()
    names: list[str] = []
    for shim in SHIMS:
        if shim.tool != tool or (frontend is not None and frontend not in shim.frontends):
            continue
        if "all" in off or shim.name in off or not applicable(shim):
            continue
        shim.apply()
        names.append(shim.name)
    return names


def explain(tool: str, message: str) -> str | None:
    """If ``message`` is a known ``tool`` bug, one sentence naming the upstream issue and the shim's state."""
    off = disabled_names()
    for shim in SHIMS:
        if shim.tool != tool or shim.signature not in message:
            continue
        if "all" in off or shim.name in off:
            state = f"disabled by {DISABLE_ENV}"
        elif not applicable(shim):
            state = f"not applied (it covers {tool}{shim.versions} with {shim.requires})"
        else:
            state = "applied, so this model hits a case the shim does not cover"
        return f"known {tool} bug {shim.issue}; the {shim.name} shim is {state}"
    return None


# ---------------------------------------------------------------- coremltools: torch frontend int cast

def _torch_op_is(*, op: str, shim: str) -> bool:
    """True when coremltools' torch op ``op`` is already the one ``shim`` registered (apply() is idempotent)."""
    registry_mod = sys.modules.get("coremltools.converters.mil.frontend.torch.torch_op_registry")
    if registry_mod is None:
        return False
    current = registry_mod._TORCH_OPS_REGISTRY.name_to_func_mapping.get(op)
    return getattr(current, "_edge_sdk_shim", None) == shim


def _coreml_torch_int_cast() -> None:
    """Re-register the torch frontend's ``int`` op with the scalar taken by ``.item()``.

    coremltools 9.0's ``_cast`` folds a compile-time constant with ``int(x.val)``. A traced module that
    computes a size (``x.view(x.size(0), -1)``, ``n = h * w``) leaves ``aten::Int`` over a
    1-element array there, and NumPy 2.4 made ``int()`` of a non-0-d array a TypeError. Everything
    else is coremltools' own conversion, unchanged.
    """
    if _torch_op_is(op="int", shim="coreml-torch-int-cast"):
        return
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    def _int(context: Any, node: Any) -> None:  # coremltools' op signature; the name is the registry key
        x = ops._get_inputs(context, node, expected=1)[0]
        if not (len(x.shape) == 0 or np.all([d == 1 for d in x.shape])):
            raise ValueError("input to cast must be either a scalar or a length 1 tensor")
        if x.can_be_folded_to_const():
            if isinstance(x.val, int):
                res = x
            else:  # the fix: a 1-element array is reduced to its one value before int()
                res = mb.const(val=int(np.asarray(x.val).reshape(-1)[0].item()), name=node.name)
        elif len(x.shape) > 0:
            res = mb.cast(x=mb.squeeze(x=x, name=node.name + "_item"), dtype="int32", name=node.name)
        else:
            res = mb.cast(x=x, dtype="int32", name=node.name)
        context.add(res, node.name)

    _int._edge_sdk_shim = "coreml-torch-int-cast"  # type: ignore[attr-defined]
    register_torch_op(_int, torch_alias=["int"], override=True)


# ---------------------------------------------------------------- coremltools: torch frontend per-channel PReLU

def _coreml_torch_prelu_rank() -> None:
    """Re-register the torch frontend's ``prelu`` op so per-channel alphas work on rank 2, 3 and 5 inputs.

    MIL's ``prelu`` honours a per-channel alpha only on rank-4 inputs; coremltools 9.0 expands rank 1-2 inputs
    to rank 3 and passes rank 3 through, so ``nn.PReLU(C)`` after a Linear (MTCNN's RNet/ONet) or a Conv1d fails
    with "rank 3 or rank 5 input is only supported when all the values of alpha are same". Upstream's fix
    (apple/coremltools#2781) expands rank 2-3 inputs to rank 4, which is what this does; a rank-5 input with
    per-channel alphas is computed as relu(x) + alpha * min(x, 0).
    """
    if _torch_op_is(op="prelu", shim="coreml-torch-prelu-rank"):
        return
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    def prelu(context: Any, node: Any) -> None:  # coremltools' op signature; the name is the registry key
        x, alpha = ops._get_inputs(context, node, expected=2)
        a = np.asarray(alpha.val, dtype=np.float32).reshape(-1)
        if x.rank >= 2:
            a = (np.ones((x.shape[1],), np.float32) * a).astype(np.float32)
        if x.rank in (2, 3):  # the fix: rank 4, where MIL's prelu takes one alpha per channel
            axes = [2, 3] if x.rank == 2 else [3]
            y = mb.prelu(x=mb.expand_dims(x=x, axes=axes), alpha=a)
            res = mb.squeeze(x=y, axes=axes, name=node.name)
        elif x.rank == 5 and not np.all(a == a[0]):
            neg = mb.mul(x=mb.minimum(x=x, y=np.float32(0.0)), y=a.reshape([1, a.size, 1, 1, 1]))
            res = mb.add(x=mb.relu(x=x), y=neg, name=node.name)
        elif x.rank == 1:
            y = mb.prelu(x=mb.expand_dims(x=x, axes=[1, 2]), alpha=a)
            res = mb.squeeze(x=y, axes=[1, 2], name=node.name)
        else:
            res = mb.prelu(x=x, alpha=a, name=node.name)
        context.add(res)

    prelu._edge_sdk_shim = "coreml-torch-prelu-rank"  # type: ignore[attr-defined]
    register_torch_op(prelu, override=True)


# ---------------------------------------------------------------- onnx2tf: TensorFlow scope names from ONNX node names

_SCOPE_OK = re.compile(r"[^A-Za-z0-9_./>-]")


def _onnx2tf_scope_names() -> None:
    """Nothing to patch in-process: onnx2tf runs in a child. The workaround is :func:`tf_safe_node_names`, applied
    to the copy of the model onnx2tf gets, when this shim is enabled."""


def tf_safe_node_names(path: Any) -> int:
    """Rename the ONNX nodes whose names TensorFlow refuses as scope names (``Softmax@0`` in PaddleOCR exports:
    "'Softmax@0' is not a valid scope name"). Only node names change — tensor names, and so the model's inputs,
    outputs and numbers, do not. Returns how many nodes were renamed; the file is rewritten only when any was."""
    import onnx

    model = onnx.load(str(path))
    taken = {n.name for n in model.graph.node}
    renamed = 0
    for node in model.graph.node:
        if node.name and (_SCOPE_OK.search(node.name) or node.name[0] in "_-/."):
            new = "n_" + _SCOPE_OK.sub("_", node.name).lstrip("_-/.")
            while new in taken:
                new += "_"
            taken.add(new)
            node.name = new
            renamed += 1
    if renamed:
        onnx.save_model(model, str(path))
    return renamed


SHIMS: tuple[Shim, ...] = (
    Shim(
        name="coreml-torch-int-cast",
        tool="coremltools",
        versions=">=8.0,<9.1",  # fixed on main by apple/coremltools#2632, first shipped in 9.1.dev1
        requires={"numpy": ">=2.4", "torch": ""},
        issue="https://github.com/apple/coremltools/issues/2633",
        summary="torch frontend 'int' op: TypeError: only 0-dimensional arrays can be converted to Python "
                "scalars under NumPy >= 2.4 (TorchScript models that compute a size and cast it)",
        apply=_coreml_torch_int_cast,
        signature="only 0-dimensional arrays can be converted to Python scalars",
        frontends=("pytorch",),
    ),
    Shim(
        name="coreml-torch-prelu-rank",
        tool="coremltools",
        versions=">=6.0,<9.1",  # fixed on main by apple/coremltools#2781 (merged 2026-08), after 9.0
        requires={"torch": ""},
        issue="https://github.com/apple/coremltools/issues/2002",
        summary="torch frontend 'prelu': per-channel nn.PReLU on (N, C) / (N, C, L) inputs fails with 'rank 3 or "
                "rank 5 input is only supported when all the values of alpha are same' (MTCNN RNet/ONet, 1-D nets)",
        apply=_coreml_torch_prelu_rank,
        signature="rank 3 or rank 5 input is only supported when all the values of alpha are same",
        frontends=("pytorch",),
    ),
    Shim(
        name="onnx2tf-scope-names",
        tool="onnx2tf",
        versions=">=1.0",  # TensorFlow's scope-name rule; onnx2tf passes ONNX node names through as they are
        issue="https://github.com/onnx/onnx-tensorflow/issues/821",
        summary="ONNX node names with characters TensorFlow refuses in scope names ('Softmax@0' in PaddleOCR "
                "exports) stop onnx2tf: \"... is not a valid scope name\"",
        apply=_onnx2tf_scope_names,
        signature="is not a valid scope name",
        frontends=("onnx",),
    ),
)
