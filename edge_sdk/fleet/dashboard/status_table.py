"""``edge-sdk fleet status``: :func:`~.views.fleet_status` rows as a table (plain text; a rich table
when rich is installed and the output is a terminal)."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["format_status", "print_status"]


_TABLE = (("FLEET", "fleet", "{}"), ("DEVICE", "device", "{}"), ("STATE", "state", "{}"),
          ("MODEL", "model", "{}"), ("WINDOWS", "windows", "{:d}"), ("INFER", "inferences", "{:d}"),
          ("P50MS", "p50_ms", "{:.1f}"), ("P95MS", "p95_ms", "{:.1f}"), ("P99MS", "p99_ms", "{:.1f}"),
          ("ERR%", "error_rate", "{:.2%}"), ("CONF", "confidence_mean", "{:.3f}"), ("PSI", "psi_latest", "{:.3f}"),
          ("ACC", "accuracy", "{:.1%}"), ("ALERTS", "alerts_open", "{:d}"), ("LOST", "lost_windows", "{:d}"),
          ("SEEN", "seen", "{}"))
_NUMERIC = {"windows", "inferences", "p50_ms", "p95_ms", "p99_ms", "error_rate", "confidence_mean", "psi_latest",
            "accuracy", "alerts_open", "lost_windows"}


def _cells(row: dict[str, Any], now: float) -> list[str]:
    values = {**row, "model": f"{row['model_name']} v{row['model_version']}" if row.get("model_name") else "-",
              "seen": _ago(now - row["last_seen"]) if row.get("last_seen") else "never"}
    out = []
    for _, key, fmt in _TABLE:
        v = values.get(key)
        out.append("-" if v is None else fmt.format(v))
    return out


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def format_status(rows: list[dict[str, Any]], *, now: float | None = None) -> str:
    """:func:`fleet_status` rows as a plain-text table (one line per device, numbers right-aligned)."""
    t = time.time() if now is None else float(now)
    table = [[h for h, _, _ in _TABLE]] + [_cells(r, t) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_TABLE))]
    lines = []
    for line in table:
        lines.append("  ".join(c.rjust(w) if key in _NUMERIC else c.ljust(w)
                               for c, w, (_, key, _) in zip(line, widths, _TABLE, strict=True)).rstrip())
    if not rows:
        lines.append("(no devices have reported yet)")
    return "\n".join(lines)


def print_status(rows: list[dict[str, Any]], file: Any = None, *, now: float | None = None) -> None:
    """Print :func:`fleet_status` rows: a rich table when rich is installed and ``file`` is a terminal, else
    :func:`format_status`."""
    import sys

    from edge_sdk._deps import has_module

    out = file or sys.stdout
    if not (has_module("rich") and getattr(out, "isatty", lambda: False)()):
        print(format_status(rows, now=now), file=out)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    styles = {"online": "green", "stale": "yellow", "offline": "red"}
    for head, key, _ in _TABLE:
        table.add_column(head, justify="right" if key in _NUMERIC else "left", no_wrap=True)
    t = time.time() if now is None else float(now)
    for r in rows:
        cells = _cells(r, t)
        cells[2] = f"[{styles.get(r['state'], 'white')}]{cells[2]}[/]"
        table.add_row(*cells)
    console = Console(file=out)
    needed = max(len(line) for line in format_status(rows, now=t).splitlines()) + 2
    console.width = max(console.width, needed)  # a narrow terminal wraps the lines rather than cutting the cells
    console.print(table)
