"""JSON from the network, parsed without trusting the interpreter's recursion limit.

``json.loads`` recurses once per nesting level, and its guard is ``sys.getrecursionlimit()``. Converter libraries
raise that limit at import (``litert_converter`` to 100,000; onnx2tf to 2**31-1), after which a 200 kB ``[[[…``
body overflows a thread's C stack and kills the whole process with SIGSEGV — no exception to catch. Measured: in
a process with the limit at 100,000, one such body on an HTTP worker thread ended the process (exit 139).

:func:`loads` measures the nesting depth first with an iterative scan (brackets inside strings do not count) and
refuses anything deeper than ``max_depth`` before the recursive parser runs. The refusal is a
:class:`JSONTooDeep`, both a ``json.JSONDecodeError`` (so a ``ValueError``) and a ``RecursionError``: every handler
that already turns bad JSON or deep recursion into a clean one-line answer keeps working unchanged. Use it for
every body, payload or file that came from outside.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["MAX_DEPTH", "JSONTooDeep", "json_depth", "loads"]

#: deeper than any document this project exchanges (telemetry, commands, predict / v2 bodies: < 12 levels)
MAX_DEPTH = 64

_JSON_STRING = re.compile(rb'"(?:[^"\\]+|\\.)*"?', re.DOTALL)  # an unclosed string runs to the end: one pass
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class JSONTooDeep(json.JSONDecodeError, RecursionError):
    """A JSON document nested deeper than the allowed depth (refused before parsing)."""

    def __init__(self, max_depth: int, doc: str = "") -> None:
        json.JSONDecodeError.__init__(self, f"nested too deeply (over {max_depth} levels)", doc, 0)
        self.args = (self.msg,)  # the reason alone, without "line 1 column 1"


def json_depth(payload: bytes | bytearray | memoryview | str, limit: int) -> int:
    """The bracket nesting depth of ``payload`` (brackets inside JSON strings do not count), without recursion;
    the scan stops as soon as it exceeds ``limit`` (returning a value > limit)."""
    data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else bytes(payload)
    brackets = _JSON_STRING.sub(b'""', data).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for b in brackets:
        if b in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def loads(payload: bytes | bytearray | memoryview | str, *, max_depth: int = MAX_DEPTH, **kwargs: Any) -> Any:
    """``json.loads(payload, **kwargs)`` after checking the nesting depth; :class:`JSONTooDeep` when deeper than
    ``max_depth``. Other errors are ``json.loads``' own (``JSONDecodeError``, ``UnicodeDecodeError``)."""
    if json_depth(payload, max_depth) > max_depth:
        raise JSONTooDeep(max_depth)
    if isinstance(payload, memoryview):
        payload = bytes(payload)
    return json.loads(payload, **kwargs)
