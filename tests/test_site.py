"""The rendered book: every chapter in nbs/sidebar.yml gets a page a reader can use.

Quarto cannot run here, so tools/site_preview.py renders the same processed notebooks Quarto would (nbdev's own
processing, then pandoc) and opens each page in headless Chromium. These tests check what the browser saw: the
title, every saved figure, math as MathML, no error output, links between chapters that resolve, the Colab badge.
Screenshots are left in site-preview/screenshots/ for a person to look at.
"""
import base64
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
OUT = ROOT / "site-preview"

_spec = importlib.util.spec_from_file_location("site_preview", ROOT / "tools" / "site_preview.py")
site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(site)

SIDEBAR = site.sidebar_notebooks()
# Math a reader would see raw if it failed to render: $...$, $$, \( or \[ left in the prose.
RAW_MATH = re.compile(r"\$\$|\$[^\s$][^$\n]*\$|\\\(|\\\[")
TRACEBACK = "Traceback (most recent call last)"


def _missing_tools():
    return [t for t in ("pandoc", "/usr/bin/chromium") if not shutil.which(t)] + \
           ([] if importlib.util.find_spec("playwright") else ["playwright"])


@pytest.fixture(scope="session")
def report():
    "Build the preview once (tools/install_site_deps.sh first, if anything it needs is missing)."
    if _missing_tools():
        subprocess.run(["bash", str(ROOT / "tools" / "install_site_deps.sh"), sys.executable], cwd=ROOT)
        importlib.invalidate_caches()
    if missing := _missing_tools():
        reason = f"site check skipped: {', '.join(missing)} missing and could not be installed"
        print(reason)
        pytest.skip(reason)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "site_preview.py"), "--out", str(OUT)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    report_file = OUT / "report.json"
    assert report_file.exists(), f"site_preview.py crashed:\n{r.stdout}\n{r.stderr[-3000:]}"
    return json.loads(report_file.read_text())["notebooks"]


def _processed(nb):
    return json.loads((ROOT / "_proc" / nb).read_text())


def _source(cell):
    return "".join(cell.get("source", ""))


# ---------------------------------------------------------------- the site's configuration


def test_sidebar_lists_the_chapters_in_reading_order():
    missing = [nb for nb in SIDEBAR if not (NBS / nb).exists()]
    assert not missing, f"nbs/sidebar.yml lists notebooks that do not exist: {missing}"
    unlisted = sorted(p.name for p in NBS.glob("[0-9]*.ipynb") if p.name not in SIDEBAR)
    assert not unlisted, f"chapters missing from nbs/sidebar.yml (readers cannot reach them): {unlisted}"
    assert len(set(SIDEBAR)) == len(SIDEBAR), "a notebook is listed twice in nbs/sidebar.yml"
    assert SIDEBAR[0] == "index.ipynb", "the front page comes first"
    numbers = [int(re.match(r"\d+", nb).group()) for nb in SIDEBAR[1:]]
    assert numbers == sorted(numbers), f"chapters out of number order in nbs/sidebar.yml: {SIDEBAR}"


def test_quarto_config():
    q = yaml.safe_load((NBS / "_quarto.yml").read_text())
    html = q["format"]["html"]
    assert html["html-math-method"] == "mathml", "math must render without a CDN"
    assert html["toc"] is True and q["website"]["navbar"]["search"] is True
    assert q["website"]["repo-actions"] and q["website"]["repo-subdir"] == "nbs"
    assert {"nbdev.yml", "sidebar.yml"} <= set(q["metadata-files"])
    assert all((NBS / f).exists() for f in q["filters"]), "a Quarto filter listed in _quarto.yml is missing"
    assert q["colab-url"] == "https://colab.research.google.com/github/vishwamai/vishwamai/blob/main/nbs"
    n = yaml.safe_load((NBS / "nbdev.yml").read_text())
    assert n["project"]["output-dir"] == "_docs"
    assert n["website"]["site-url"] == "https://vishwamai.github.io/vishwamai"
    assert n["website"]["repo-url"] == "https://github.com/vishwamai/vishwamai"


# ---------------------------------------------------------------- every chapter page


@pytest.mark.parametrize("nb", SIDEBAR)
def test_chapter_page(report, nb):
    res = report.get(nb)
    assert res is not None, f"{nb}: no page was built"
    assert not res["proc_error"], f"{nb}: nbdev's docs processing fails (nbdev-docs would too):\n{res['proc_error']}"
    assert not res["render_error"], f"{nb}: {res['render_error']}"
    assert "Could not convert TeX math" not in res["pandoc_stderr"], f"{nb}: bad math:\n{res['pandoc_stderr']}"
    seen, page = res["seen"], res["page"]

    # A title and a one-line description in front matter; the title is shown.
    fm = res["front_matter"]
    assert fm.get("title") and fm.get("description"), f"{nb}: front matter needs a title and a description"
    assert seen["title"] == str(fm["title"]) and seen["title_visible"], f"{page}: title not shown: {seen['title']!r}"

    # Every saved figure is on the page and loads (pandoc names each image by the SHA-1 of its bytes).
    proc = _processed(nb)
    loaded = {Path(i["src"]).stem for i in seen["images"] if i["loaded"]}
    for cell in proc["cells"]:
        for out in site.shown_outputs(cell):
            for mime, data in out.get("data", {}).items():
                if mime not in site.IMAGE_TYPES: continue
                data = "".join(data)
                raw = data.encode() if mime == "image/svg+xml" else base64.b64decode(data)
                assert hashlib.sha1(raw).hexdigest() in loaded, \
                    f"{page}: a saved figure is missing or does not load (cell: {_source(cell)[:80]!r})"

    # Math is MathML: present where the notebook has $ math, none left raw in the prose.
    if any(cell["cell_type"] == "markdown" and RAW_MATH.search(_source(cell)) for cell in proc["cells"]):
        assert seen["math"] > 0, f"{page}: the notebook has $ math but the page has no <math> element"
    assert not seen["math_failed"], f"{page}: math that did not become MathML: {seen['math_failed'][:3]}"
    raw = RAW_MATH.findall(seen["text"])
    assert not raw, f"{page}: raw TeX left in the text: {raw[:5]}"

    # No saved error output, in the notebook or on the page.
    for cell in json.loads((NBS / nb).read_text())["cells"]:
        for out in cell.get("outputs", []):
            text = json.dumps(out)
            assert out["output_type"] != "error" and TRACEBACK not in text, \
                f"{nb}: saved error output in cell {_source(cell)[:80]!r}"
    assert TRACEBACK not in seen["text"], f"{page}: shows a traceback"

    # Links between chapters resolve to pages of the book, and to sections that exist on them.
    for href in seen["links"]:
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#", href): continue
        target, _, section = href.partition("#")
        assert (OUT / target).exists(), f"{page}: link to {href!r} does not resolve to a page of the book"
        if section:  # Quarto keeps the dots of nbdev's symbol anchors (`moe.update_bias`); the preview's ids drop them
            html = (OUT / target).read_text()
            assert any(f'id="{s}"' in html for s in (section, section.replace(".", ""))), \
                f"{page}: link to {href!r}: {target} has no such section"

    # The Open-in-Colab badge opens this very notebook.
    assert f"{site.colab_url()}/{nb}" in seen["links"], f"{page}: no Open-in-Colab link"

    shot = OUT / res["screenshot"]
    assert shot.exists() and shot.stat().st_size > 10_000, f"{page}: no screenshot"
