"""The toolkit's HTML pages: one self-contained file each, rendered by Jinja2 with autoescaping.

Everything a page shows that a stranger wrote (class names, the template, paths,
configs) goes through Jinja2's autoescaping, never through string concatenation;
text is placed only in element content and quoted attributes, never in a URL,
a script or a style.  Pages carry no script at all, and a Content-Security-Policy
that forbids scripts and every network fetch, so even a missed escape could not
run code or call home.  Figures are matplotlib PNGs (Agg backend, no pyplot
state) embedded as data: URIs, so a page opens offline wherever it is copied.

``scan_page`` renders a scan's ``report.html``; ``ci_core.harness.report.html``
renders ``ci-bench report``'s.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import jinja2

_ENV: jinja2.Environment | None = None


def environment() -> jinja2.Environment:
    """The one Jinja2 environment of the pages: autoescape on for every template, undefined names are errors."""
    global _ENV
    if _ENV is None:
        _ENV = jinja2.Environment(loader=jinja2.PackageLoader("ci_core.pages", "templates"), autoescape=True,
                                  undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        _ENV.filters["num"] = format_number
        _ENV.filters["visible"] = visible_text
    return _ENV


def render(template: str, **values: Any) -> str:
    return environment().get_template(template).render(**values)


def format_number(value: Any, digits: int = 3) -> str:
    """A number as a page shows it: n/a for None, yes/no for booleans, 3 decimals; tiny (p-values) and huge ones
    (a runaway context) in e-notation."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 10 ** -digits or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def new_figure(width: float, height: float):
    """A matplotlib figure on the Agg backend, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_data_uri(figure, dpi: int = 110) -> str:
    """The figure as a data: URI, to embed in a page."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return file_data_uri(buffer.getvalue())


def file_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def visible_text(text: Any) -> str:
    """A stranger's text with the characters that steer how text is shown, rather than being shown (bidirectional
    overrides and marks, other format and control characters), written out as code points: an auditor sees
    "<U+202E>gnp.exe" where a browser would draw "exe.png"."""
    return "".join(c if c.isprintable() and c not in "\u200e\u200f" else f"<U+{ord(c):04X}>" for c in str(text))


def plain_label(text: str, limit: int = 40) -> str:
    """A stranger's text as a figure label: its steering characters visible (``visible_text``), shortened."""
    shown = visible_text(text)
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"
