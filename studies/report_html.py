"""Rendering for ``studies.report``: a list of blocks -> ``report.md`` and a self-contained ``report.html``
(PNGs embedded as data URIs, a table of contents linking to every section, no external resources)."""
from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path
from typing import Any, Sequence

from .report_io import QUICK_LABEL

__all__ = ["Block", "render", "markdown_tables", "slug", "PNG_SIGNATURE"]

#: a block is ``(kind, payload)``: ``("h1"|"h2"|"h3", text)``, ``("p", text)``, ``("quick", text)`` (a flagged
#: paragraph), ``("ul", [text])``, ``("table", (header, rows))``, ``("img", (path, caption))``, ``("toc", None)``
Block = tuple[str, Any]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

STYLE = ("body{font-family:sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;line-height:1.4;color:#111}"
         "table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:85%}"
         "td,th{border:1px solid #bbb;padding:2px 6px;vertical-align:top}th{background:#eee;text-align:left}"
         "img{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}figcaption{font-size:80%;color:#555}"
         ".quick{background:#fde8e8;color:#8a1010;font-weight:bold;padding:0 .3em}"
         "p.quick{padding:.4em .6em;border-left:4px solid #c33}code{background:#f4f4f4}")


def slug(text: str, taken: set[str]) -> str:
    """A unique HTML id from ``text`` (lower case, runs of other characters -> ``-``)."""
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    out, i = base, 2
    while out in taken:
        out, i = f"{base}-{i}", i + 1
    taken.add(out)
    return out


def _inline(text: str) -> str:
    """Escaped text with ``code`` spans and the smoke-run label highlighted."""
    out = html.escape(str(text))
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return out.replace(html.escape(QUICK_LABEL), f'<span class="quick">{html.escape(QUICK_LABEL)}</span>')


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _split_row(line: str) -> list[str]:
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


def markdown_tables(md: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every pipe table of a markdown text as ``(header, rows)`` (separator rows dropped; prose ignored)."""
    tables, block = [], []
    for line in md.splitlines() + [""]:
        if line.strip().startswith("|"):
            block.append(_split_row(line))
            continue
        if block:
            head, body = block[0], [r for r in block[1:] if not all(re.fullmatch(r":?-+:?", c or "-") for c in r)]
            tables.append((head, body))
            block = []
    return tables


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_inline(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render(blocks: Sequence[Block], out_dir: Path, title: str = "odecm report") -> tuple[str, str]:
    """``(markdown, html)`` of the blocks. Headings get unique ids; a ``toc`` block becomes a list of links to
    every h2 / h3 (HTML only). Images must be PNG files: they are embedded (HTML) or linked relative to
    ``out_dir`` (markdown); a file that is not a PNG is named instead of shown."""
    taken: set[str] = set()
    ids = [slug(val, taken) if kind in ("h1", "h2", "h3") else "" for kind, val in blocks]
    toc_items = [(kind, val, i) for (kind, val), i in zip(blocks, ids) if kind in ("h2", "h3")]
    md, hb = [], []
    for (kind, val), hid in zip(blocks, ids):
        if kind in ("h1", "h2", "h3"):
            md.append("#" * int(kind[1]) + " " + val)
            hb.append(f'<{kind} id="{hid}">{_inline(val)}</{kind}>')
        elif kind == "toc":
            indent = ' style="margin-left:1.5em"'
            items = "".join(f'<li{indent if k == "h3" else ""}><a href="#{i}">{_inline(t)}</a></li>'
                            for k, t, i in toc_items)
            hb.append(f"<nav><h2 id=\"{slug('contents', taken)}\">Contents</h2><ul>{items}</ul></nav>")
        elif kind in ("p", "quick"):
            md.append(f"**{val}**" if kind == "quick" else val)
            hb.append(f'<p class="quick">{_inline(val)}</p>' if kind == "quick" else f"<p>{_inline(val)}</p>")
        elif kind == "ul":
            items = list(val) or ["(none)"]
            md.append("\n".join(f"- {x}" for x in items))
            hb.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in items) + "</ul>")
        elif kind == "table":
            header, rows = val
            md.append(_md_table(header, rows))
            hb.append(_html_table(header, rows))
        elif kind == "img":
            path, caption = (val, "") if isinstance(val, (str, Path)) else val
            path = Path(path)
            data = path.read_bytes() if path.is_file() else b""
            cap = f"{caption} ({path.name})" if caption else path.name
            if not data.startswith(PNG_SIGNATURE):
                md.append(f"(figure {path} is missing or not a PNG: not shown)")
                hb.append(f"<p>{_inline(f'(figure {path} is missing or not a PNG: not shown)')}</p>")
                continue
            rel = Path(os.path.relpath(path.resolve(), Path(out_dir).resolve()))
            md.append(f"![{_md_cell(cap)}]({rel.as_posix()})")
            b64 = base64.b64encode(data).decode()
            hb.append(f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{b64}">'
                      f"<figcaption>{_inline(cap)}</figcaption></figure>")
        else:
            raise ValueError(f"block kind {kind!r}; allowed: h1, h2, h3, p, quick, ul, table, img, toc")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(hb) + "\n</body></html>\n")
    return "\n\n".join(md) + "\n", page
