"""One self-contained HTML page: tables inline, images as base64 data URIs, no external resource."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import pandas as pd
from PIL import Image

from reports.tables import Table

__all__ = ["data_uri", "image_tag", "render_page", "table_html"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; white-space: nowrap; }
th { background: #f3f3f3; }
caption { caption-side: top; text-align: left; padding-bottom: 0.4em; color: #444; }
.note { background: #fff8e0; border-left: 4px solid #e0b000; padding: 0.4em 0.8em; }
.grids { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; }
figcaption { font-size: 0.85em; color: #444; }
img { max-width: 100%; }
.scroll { overflow-x: auto; }
"""


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data:<mime>;base64,...`` for ``data``."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_tag(path: str | Path, alt: str, max_px: int | None = None) -> str:
    """An ``<img>`` embedding the PNG at ``path``, shrunk to at most ``max_px`` on its long side.

    Args:
        path: a PNG file.
        alt: the alternative text.
        max_px: the longest side in the page; None keeps the file as it is (default None).
    """
    data = Path(path).read_bytes()
    if max_px is not None:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) > max_px:
                im.thumbnail((max_px, max_px))
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                data = buf.getvalue()
    return f'<img src="{data_uri(data)}" alt="{html.escape(alt)}">'


def table_html(table: Table | pd.DataFrame, caption: str | None = None) -> str:
    """A ``<table>`` of a :class:`Table`'s display cells (or of a DataFrame), escaped."""
    df = table.display if isinstance(table, Table) else table
    caption = table.caption if isinstance(table, Table) and caption is None else caption
    body = df.to_html(index=False, border=0, na_rep="", escape=True)
    if caption:
        body = body.replace("<thead>", f"<caption>{html.escape(caption)}</caption>\n<thead>", 1)
    return f'<div class="scroll">{body}</div>'


def render_page(title: str, sections: list[tuple[str, str]]) -> str:
    """The whole page: a title and (heading, HTML body) sections, with inline CSS."""
    parts = [f"<section>\n<h2>{html.escape(h)}</h2>\n{body}\n</section>" for h, body in sections]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{STYLE}</style>",
            "</head>",
            "<body>",
            f"<h1>{html.escape(title)}</h1>",
            *parts,
            "</body>",
            "</html>",
            "",
        ]
    )
