"""What every serving protocol shares: the answer, the worker's outcome, route templates, the served model.

A protocol module turns a request body into a *job* run on the agent's single inference worker (parsing included,
so a body costs CPU only once admitted) and returns an :class:`Outcome`: the predictions made (the server records
their latency and refuses NaN / Inf outputs, the same for every route) and a ``render`` callable the HTTP thread
calls to build the :class:`Reply` (encoding output tensors off the worker, while the next inference runs).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np

from edge_sdk import safe_json
from edge_sdk.bundle import TensorSpec
from edge_sdk.errors import EdgeSDKError, HTTPError, first_line

if TYPE_CHECKING:
    from edge_sdk.device_agent.agent import Agent, Prediction

__all__ = ["MAX_RANK", "Outcome", "Reply", "RouteTable", "ServedModel", "element_count", "finite", "json_reply",
           "load_json", "output_specs", "served_model"]

#: Most dimensions a request may give a tensor (numpy's own limit is 64; no model input has more than a few).
MAX_RANK = 16


@dataclass(frozen=True)
class Reply:
    """A complete HTTP answer: status, body bytes, content type and extra headers."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    """What an inference job hands back from the worker: its predictions and how to answer with them."""

    predictions: list[Prediction]
    render: Callable[[], Reply]


def json_reply(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    """``payload`` as compact JSON (NaN and Infinity refused: they are not JSON)."""
    return Reply(status, json.dumps(payload, allow_nan=False, separators=(",", ":")).encode(), "application/json",
                 headers or {})


def load_json(body: bytes | memoryview, usage: str) -> Any:
    """The JSON document of ``body``; HTTPError 400 naming the problem and ``usage`` (what to send instead)."""
    try:
        return safe_json.loads(bytes(body))
    except RecursionError:  # safe_json.JSONTooDeep included (it is also a JSONDecodeError)
        raise HTTPError(400, "bad_json", f"body is nested too deeply: {usage}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HTTPError(400, "bad_json", f"body is not valid JSON ({first_line(exc, 300)}): {usage}") from None


def element_count(shape: Any, what: str) -> tuple[list[int], int]:
    """``(shape, number of elements)`` of a JSON shape; HTTPError 400 unless it is a list of at most
    :data:`MAX_RANK` integers >= 0. The product is a Python int: a hostile shape cannot overflow it, and nothing is
    ever allocated from a shape alone (callers compare the count with the data actually sent)."""
    if not isinstance(shape, list) or len(shape) > MAX_RANK or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise HTTPError(400, "bad_shape", f"{what}: \"shape\" must be a list of at most {MAX_RANK} integers >= 0, "
                        f"got {json.dumps(shape)[:80]}")
    n = 1
    for d in shape:
        n *= d
    return list(shape), n


# -- the served model ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedModel:
    """Name, version and tensors of the model being served, as the standard protocols name them."""

    name: str
    version: str
    runtime: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def check(self, name: str, version: str | None) -> None:
        """HTTPError 404 unless ``name`` (and ``version``, when given) is the model served here."""
        if name != self.name:
            raise HTTPError(404, "unknown_model", f"unknown model {name[:100]!r}: this agent serves "
                            f"{self.name!r} (version {self.version!r})")
        if version is not None and version != self.version:
            raise HTTPError(404, "unknown_version", f"model {name!r} has no version {version[:100]!r}: this agent "
                            f"serves version {self.version!r}")


def output_specs(agent: Agent) -> list[TensorSpec]:
    """The agent's outputs in the order and with the names of ``agent.output_names`` (shapes and dtypes from the
    manifest when it names them, else from the runtime session)."""
    names = list(agent.output_names)
    manifest = list(agent.bundle.manifest.outputs)
    if [s.name for s in manifest] == names and all(s.dtype for s in manifest):
        return manifest
    session = list(agent.session.outputs)
    by_name = {s.name: s for s in session}
    if all(n in by_name for n in names):
        return [by_name[n] for n in names]
    return [TensorSpec(n, list(s.shape), s.dtype) for n, s in zip(names, session, strict=False)]


def served_model(agent: Agent) -> ServedModel:
    """The :class:`ServedModel` of ``agent`` (HTTPError 503 when no model is loaded)."""
    try:
        m = agent.bundle.manifest
        return ServedModel(str(m.name), str(m.version), str(agent.runtime_name), tuple(agent.input_specs),
                           tuple(output_specs(agent)))
    except EdgeSDKError as exc:  # between stop and exit
        raise HTTPError(503, "unavailable", f"no model is loaded ({first_line(exc, 200)}): retry later") from None


# -- routes ----------------------------------------------------------------------------------------------------
_PARAM = re.compile(r"\{(\w+)\}")


class RouteTable:
    """Route templates (``/v2/models/{name}/infer``) -> allowed methods; :meth:`match` finds a path's template.

    A parameter matches one path segment without ``:`` (TF Serving puts ``:predict`` right after the name) and is
    percent-decoded. Static routes are looked up first, in one dictionary access.
    """

    def __init__(self, routes: Mapping[str, tuple[str, ...]]) -> None:
        self.routes = dict(routes)
        self._static = {t: t for t in self.routes if "{" not in t}
        self._patterns = [(t, re.compile(self._regex(t))) for t in self.routes if "{" in t]

    @staticmethod
    def _regex(template: str) -> str:
        out, pos = [], 0
        for m in _PARAM.finditer(template):
            out += [re.escape(template[pos:m.start()]), f"(?P<{m.group(1)}>[^/:]+)"]
            pos = m.end()
        return "".join([*out, re.escape(template[pos:])]) + r"\Z"

    def match(self, path: str) -> tuple[str, dict[str, str]] | None:
        """``(template, {parameter: value})`` of ``path``, or None."""
        if path in self._static:
            return path, {}
        for template, rx in self._patterns:
            m = rx.match(path)
            if m is not None:
                return template, {k: unquote(v) for k, v in m.groupdict().items()}
        return None

    def templates(self) -> Iterable[str]:
        """Every route template."""
        return self.routes.keys()


def finite(values: Iterable[np.ndarray]) -> bool:
    """True when no floating-point array holds NaN or Inf."""
    return all(np.isfinite(v).all() for v in values if v.dtype.kind == "f")
