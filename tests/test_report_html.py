"""The self-contained report.html: its structure (html.parser) and its rendering in a real browser (Debian's
chromium, headless): images decoded and painted, tables drawn, the page not blank."""
from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studies import report
from studies.report_html import PNG_SIGNATURE
from studies.report_io import QUICK_LABEL
from test_report import make_results

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--force-device-scale-factor=1", "--hide-scrollbars"]
#: the colours of the planted figures (make_results): score_error red, latent_space blue, image_world (quick) green
PLANTED = {"score_error": (255, 0, 0), "latent_space": (0, 0, 255), "image_world": (0, 160, 0)}
FIGURE = (320, 160)
VOID = {"meta", "img", "br", "hr", "link", "input"}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = make_results(tmp_path_factory.mktemp("results"))
    _, html_path, _ = report.build_report(root, root / "report")
    return html_path, html_path.read_text()


class Structure(HTMLParser):
    """Headings, tables (header row and body rows), images, links, ids and tag balance of a page."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors = [], []
        self.headings, self.tables, self.images, self.links, self.ids, self.external = [], [], [], [], [], []
        self._text = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        for key in ("src", "href"):
            v = a.get(key)
            if v is not None and not v.startswith(("#", "data:")):
                self.external.append(v)
        if tag == "a" and a.get("href", "").startswith("#"):
            self.links.append(a["href"][1:])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "table":
            self.tables.append({"head": [], "rows": []})
        elif tag == "tr":
            self._row = []
            self._in_head = "thead" in self.stack
        elif tag in ("td", "th"):
            self._cell = (tag, "")
        if tag in ("h1", "h2", "h3"):
            self._text = ""
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()
        if tag in ("td", "th"):
            self._row.append(self._cell)
        elif tag == "tr":
            t = self.tables[-1]
            if self._in_head:
                t["head"].append(self._row)
            else:
                t["rows"].append(self._row)
        elif tag in ("h1", "h2", "h3"):
            self.headings.append((tag, self._text.strip()))
            self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text += data
        if "td" in self.stack or "th" in self.stack:
            self._cell = (self._cell[0], self._cell[1] + data)


def parse(text: str) -> Structure:
    p = Structure()
    p.feed(text)
    p.close()
    return p


def test_structure(page):
    _, text = page
    p = parse(text)
    assert not p.errors and p.stack == [], p.errors[:5]
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text
    # every table has one header row of <th> cells, and body rows of the same width
    assert len(p.tables) >= 10
    for t in p.tables:
        assert len(t["head"]) == 1 and t["head"][0] and all(tag == "th" for tag, _ in t["head"][0]), t["head"]
        width = len(t["head"][0])
        assert t["rows"] and all(len(r) == width and all(tag == "td" for tag, _ in r) for r in t["rows"])
    # every image is an embedded PNG that decodes, at the size it was written
    assert len(p.images) == len(PLANTED)
    for src in p.images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.format == "PNG" and im.size == FIGURE
    # self-contained; every internal link has its target; ids unique
    assert p.external == []
    assert len(p.ids) == len(set(p.ids))
    assert p.links and set(p.links) <= set(p.ids), set(p.links) - set(p.ids)
    # headings: each study in the verdict section (when it counts) and in the studies section
    h3 = [t for tag, t in p.headings if tag == "h3"]
    for name in ("score_error", "latent_space", "inductive_bias", "solver_ablation", "sdxl_table"):
        assert any(t.startswith(f"{name}: ") and "regimes show the paradox" in t for t in h3), name
        assert name in h3, name
    assert f"image_world ({QUICK_LABEL})" in h3
    assert [t for tag, t in p.headings if tag == "h2"] == ["Contents", "Summary", "Where does the paradox appear?",
                                                           "Evidence per explanation", "Studies"]


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


PROBE = ("<script>window.addEventListener('load', function () {"
         "var im = Array.prototype.slice.call(document.images);"
         "document.body.setAttribute('data-images', im.length);"
         "document.body.setAttribute('data-decoded', im.filter(function (i) {"
         "  return i.complete && i.naturalWidth > 0; }).length);"
         "document.body.setAttribute('data-tables', document.querySelectorAll('table').length);"
         "});</script></body>")


def _render(tmp: Path, html: Path, name: str, dump: bool = False) -> tuple[np.ndarray, str]:
    """Screenshot (1280 x 2400) of ``html`` and, with ``dump``, the DOM after the load event."""
    png = tmp / f"{name}.png"
    res = _chromium(tmp, f"--screenshot={png}", "--window-size=1280,2400", *(["--dump-dom"] if dump else []),
                    html.resolve().as_uri())
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB")), res.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_renders_in_chromium(page, tmp_path):
    _, text = page
    p = parse(text)
    # 1. the page (plus a script that only reads the DOM after load): not blank, tables drawn, images decoded
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE))
    shot, dom = _render(tmp_path, probe, "page", dump=True)
    assert shot.shape == (2400, 1280, 3)
    non_white = (shot < 245).any(axis=2).mean()
    assert non_white > 0.03, non_white
    assert (shot == 238).all(axis=2).sum() > 5000  # th{background:#eee}: table headers painted
    n = len(p.images)
    assert f'data-images="{n}"' in dom and f'data-decoded="{n}"' in dom, dom[:300]
    assert f'data-tables="{len(p.tables)}"' in dom
    # 2. the figures alone (everything else hidden): each planted colour painted at the figure's size
    figs = tmp_path / "figures.html"
    figs.write_text(text.replace("</head>", "<style>body>*:not(figure){display:none}</style></head>"))
    shot, _ = _render(tmp_path, figs, "figures")
    for name, rgb in PLANTED.items():
        painted = (np.abs(shot.astype(int) - np.array(rgb)) <= 8).all(axis=2).sum()
        assert painted == pytest.approx(FIGURE[0] * FIGURE[1], rel=0.05), (name, painted)
