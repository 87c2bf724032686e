"""Numbers, table cells and text blocks formatted for report.md."""
from __future__ import annotations

import re
from typing import Any

from .load import accuracy_ci, is_num


def f3(v: Any) -> str:
    """A number to 3 decimals, "—" when it is missing."""
    return f"{v:.3f}" if is_num(v) else "—"


def pct(v: float) -> str:
    """A share as a whole percentage: 0.934 -> "93%"."""
    return f"{100 * v:.0f}%"


def pts(v: float) -> str:
    """A difference of shares in signed percentage points: 0.125 -> "+12.5"."""
    return f"{100 * v:+.1f}"


def acc_cell(s: dict[str, Any]) -> str:
    """An eval summary's accuracy with its 95% interval: "0.625 [0.556, 0.689]"."""
    ci = accuracy_ci(s)
    return f3(s.get("accuracy")) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def majority_cell(s: dict[str, Any]) -> str:
    """An eval summary's majority baseline and class: "0.500 (No)"."""
    base = s.get("majority_baseline")
    if not is_num(base):
        return "—"
    return f"{base:.3f}" + (f" ({s['majority_class']})" if s.get("majority_class") is not None else "")


def shorten(text: Any, n: int) -> str:
    """Whitespace collapsed to single spaces, cut to at most n characters with an ellipsis."""
    t = " ".join(str(text or "").split())
    return t if len(t) <= n else t[: n - 1].rstrip() + "…"


def fence(text: str) -> str:
    """A fenced code block whose fence is longer than any backtick run inside the text."""
    runs = [len(m) for m in re.findall(r"`+", text)]
    marks = "`" * max(3, max(runs, default=0) + 1)
    return f"{marks}text\n{text.rstrip()}\n{marks}"


def md_cell(text: str) -> str:
    """Text that cannot break a markdown table row (pipes escaped, newlines removed)."""
    return str(text).replace("|", "\\|").replace("\n", " ")
