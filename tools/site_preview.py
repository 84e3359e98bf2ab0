"""Offline preview of the Vishwamai book: the chapters of nbs/sidebar.yml, rendered with pandoc and opened in Chromium.

The published site is rendered by Quarto (`nbdev-docs`). Where Quarto is not installed (our CI has no network to
fetch it) this script gets as close as it can to what readers will see, in three steps:

1. **The processed notebooks, made by nbdev itself.** `nbdev-proc-nbs` would make them, but it first calls
   `nbdev.quarto._ensure_quarto()`, which downloads and installs Quarto and so fails offline. We call nbdev's
   `_pre_docs` (the whole body of `nbdev-proc-nbs`: `refresh_quarto_yml`, `_build_modidx`, `nbdev_sidebar`,
   `proc_nbs`) with only that step replaced by a no-op. We call it once per notebook (`file_glob`), so one broken
   chapter does not hide the others. Results land in `_proc/`, exactly where `nbdev-docs` puts them.
2. **One HTML page per chapter**, by pandoc (`-f ipynb -t html5 -s --mathml`). Before pandoc we apply what Quarto
   would: the front matter becomes the page title and subtitle, the cell options that change what is shown
   (`#| echo: false`, `#| output: false`, `#| include: false`) take effect and `#|` lines are hidden. The Colab badge
   comes from the same Lua filter the site uses (nbs/colab_badge.lua). Pages get nbdev's names (`00_config.ipynb`
   -> `config.html`), and links to notebooks or to the published site are rewritten to those local pages.
3. **A look in a real browser.** Each page is opened in headless Chromium (Debian's `/usr/bin/chromium`, driven by
   Playwright; no browser is downloaded), screenshotted, and what a reader sees (title, MathML elements, images and
   whether they loaded, links, the badge, visible text) is written to `report.json`. tests/test_site.py checks it.

This is a preview, not the published site: Quarto's theme, sidebar, search and cross-references are absent, and
pandoc renders a few things differently (pandoc 2.17 sets `\\mathrm{}` in italics).

Usage: .venv/bin/python tools/site_preview.py [--out site-preview] [--no-browser]
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import yaml

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/svg+xml": ".svg", "image/gif": ".gif"}


# ---------------------------------------------------------------- the book's structure


def sidebar_parts(sidebar: Path = NBS / "sidebar.yml") -> list[tuple[str, list[str]]]:
    "The parts of the book and their notebooks, in reading order, as nbs/sidebar.yml lists them."
    def walk(items, part, out):
        for item in items:
            if isinstance(item, str): out.setdefault(part, []).append(item)
            elif isinstance(item, dict) and "section" in item: walk(item.get("contents", []), item["section"], out)
            elif isinstance(item, dict) and "href" in item: out.setdefault(part, []).append(item["href"])
            else: raise ValueError(f"{sidebar}: unexpected sidebar entry {item!r}")
        return out
    contents = yaml.safe_load(sidebar.read_text())["website"]["sidebar"]["contents"]
    return list(walk(contents, "", {}).items())


def sidebar_notebooks(sidebar: Path = NBS / "sidebar.yml") -> list[str]:
    "Every page in nbs/sidebar.yml, in reading order."
    return [nb for _, nbs in sidebar_parts(sidebar) for nb in nbs]


def page_name(notebook: str) -> str:
    "The HTML page nbdev gives a notebook (its `output-file`): `00_config.ipynb` -> `config.html`."
    from nbdev.config import nbpath2html
    return nbpath2html(Path(notebook)).as_posix()


# ---------------------------------------------------------------- step 1: nbdev's processing


def process_notebooks(notebooks: list[str]) -> dict[str, dict]:
    "Run nbdev's docs processing into _proc/ for each notebook; returns {notebook: {error, warnings}}."
    import nbdev.quarto
    found = {}
    cwd = os.getcwd()
    # Quarto is only needed to render, which we do not do here: skip nbdev's download-and-install step.
    with mock.patch.object(nbdev.quarto, "_ensure_quarto", lambda: None):
        for nb in notebooks:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try: nbdev.quarto._pre_docs(str(NBS), n_workers=0, file_glob=Path(nb).name); err = None
                except Exception as e: err = f"{type(e).__name__}: {e}"
                finally: os.chdir(cwd)
            found[nb] = {"error": err, "warnings": [str(w.message) for w in caught]}
    return found


# ---------------------------------------------------------------- step 2: pandoc


def cell_options(source: str) -> dict[str, str]:
    "Quarto cell options from the leading `#| key: value` lines of a code cell."
    opts = {}
    for line in source.splitlines():
        m = re.match(r"\s*#\|\s*([\w-]+)\s*:\s*(.*?)\s*$", line)
        if not m: break
        opts[m.group(1)] = m.group(2).strip("'\"").lower()
    return opts


def shown_outputs(cell: dict) -> list[dict]:
    "The outputs of a processed notebook's cell that Quarto shows."
    opts = cell_options("".join(cell.get("source", "")))
    if cell["cell_type"] != "code" or opts.get("include") == "false" or opts.get("output") == "false": return []
    return cell.get("outputs", [])


def front_matter(nb: dict) -> dict:
    "The YAML front matter of a processed notebook (its first raw cell), or {} if there is none."
    for cell in nb["cells"]:
        if cell["cell_type"] == "raw":
            m = re.match(r"\s*---\n(.*?)\n---", "".join(cell["source"]), re.S)
            return (yaml.safe_load(m.group(1)) or {}) if m else {}
        if "".join(cell["source"]).strip(): return {}
    return {}


def for_pandoc(nb: dict) -> dict:
    "A copy of a processed notebook that pandoc shows as Quarto would (front matter out, cell options applied)."
    cells = []
    for cell in nb["cells"]:
        src = "".join(cell.get("source", ""))
        if cell["cell_type"] == "raw" and re.match(r"\s*---\n", src): continue  # front matter: becomes metadata
        if cell["cell_type"] != "code":
            cells.append(cell)
            continue
        opts = cell_options(src)
        if opts.get("include") == "false": continue
        code = {**cell, "source": "" if opts.get("echo") == "false" else "\n".join(src.splitlines()[len(opts):]),
                "outputs": []}
        for out in shown_outputs(cell):
            if "text/markdown" in out.get("data", {}):
                # Quarto renders a Markdown output (show_doc, tables) as Markdown; pandoc 2.17 would show its
                # text/plain instead. So it becomes a Markdown cell, and the code cell continues after it.
                if code["source"] or code["outputs"]: cells.append(code)
                cells.append({"cell_type": "markdown", "metadata": {}, "source": "".join(out["data"]["text/markdown"])})
                code = {**code, "source": "", "outputs": []}
            else:
                # pandoc 2.17 rejects the `execution_count: null` that nbformat allows on outputs
                if out.get("execution_count", 0) is None: out = {**out, "execution_count": 0}
                code["outputs"].append(out)
        if code["source"] or code["outputs"]: cells.append(code)
    return {**nb, "cells": cells}


def colab_url() -> str:
    "The prefix of every Colab link, set once in nbs/_quarto.yml."
    return yaml.safe_load((NBS / "_quarto.yml").read_text())["colab-url"]


def site_url() -> str:
    "The published site's address, from nbs/nbdev.yml (which nbdev writes from pyproject.toml)."
    return yaml.safe_load((NBS / "nbdev.yml").read_text())["website"]["site-url"].rstrip("/") + "/"


def local_links(page: str, pages: dict[str, str]) -> str:
    "Point links at the preview's pages: `X.ipynb` -> X's page, and the published site's pages -> the local copy."
    base = site_url()

    def fix(m):
        href = html.unescape(m.group(2))
        if href.startswith(base): href = href[len(base):] or "index.html"
        elif re.match(r"^[a-z][a-z0-9+.-]*:", href) or href.startswith(("#", "/")): return m.group(0)
        path, frag = (href.split("#", 1) + [""])[:2]
        if path.endswith(".ipynb"): path = pages.get(Path(path).name, page_name(path))
        return f'{m.group(1)}"{html.escape(path + ("#" + frag if frag else ""))}"'
    return re.sub(r'(<a\b[^>]*?\shref=)"([^"]*)"', fix, page)


def nav_html(parts, pages: dict[str, str], titles: dict[str, str]) -> str:
    "A compact table of contents for the top of every preview page, from the sidebar."
    rows = []
    for part, nbs in parts:
        links = " · ".join(f'<a href="{pages[nb]}">{html.escape(titles.get(nb, nb))}</a>' for nb in nbs)
        rows.append(f"<div><strong>{html.escape(part)}</strong>: {links}</div>" if part else f"<div>{links}</div>")
    return ('<nav class="preview-nav"><div class="preview-note">Offline preview rendered with pandoc; '
            'the published site is rendered by Quarto (<code>nbdev-docs</code>).</div>' + "".join(rows) + "</nav>")


PREVIEW_CSS = """
.preview-nav { font-size: 0.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.5em; margin-bottom: 1em; }
.preview-note { color: #777; }
body { max-width: 52em; }
"""


def render_pages(notebooks: list[str], out: Path, parts) -> dict:
    "Render each of `notebooks` from _proc/ to out/<page>.html with pandoc; returns facts per notebook."
    from nbdev.config import get_config
    proc = get_config(ROOT).config_path / "_proc"
    shutil.copy(NBS / "styles.css", out / "styles.css")
    (out / "preview.css").write_text(PREVIEW_CSS)
    nbs = {nb: json.loads((proc / nb).read_text()) for nb in notebooks if (proc / nb).exists()}
    results = {nb: {"page": page_name(nb), "render_error": f"{proc / nb} is missing (cleared while building?)"}
               for nb in notebooks if nb not in nbs}
    fms = {nb: front_matter(d) for nb, d in nbs.items()}
    pages = {nb: fms.get(nb, {}).get("output-file") or page_name(nb) for _, part in parts for nb in part}
    titles = {nb: str(fm.get("title", nb)) for nb, fm in fms.items()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "nav.html").write_text(nav_html(parts, pages, titles))
        for nb, data in nbs.items():
            src = tmp / nb  # same file name as the notebook: the Colab badge is built from it
            src.write_text(json.dumps(for_pandoc(data)))
            meta = {"title": titles[nb], "pagetitle": titles[nb]}
            if fms[nb].get("description"): meta["subtitle"] = str(fms[nb]["description"])
            (tmp / "meta.yml").write_text(yaml.safe_dump(meta, allow_unicode=True))
            cmd = ["pandoc", str(src), "-f", "ipynb", "-t", "html5", "-s", "--mathml",
                   "--lua-filter", str(NBS / "colab_badge.lua"), "-M", f"colab-url={colab_url()}",
                   "--metadata-file", str(tmp / "meta.yml"), "--css", "styles.css", "--css", "preview.css",
                   "--include-before-body", str(tmp / "nav.html"),
                   "--extract-media", f"media/{Path(pages[nb]).stem}", "-o", pages[nb]]
            r = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
            page = out / pages[nb]
            if r.returncode == 0: page.write_text(local_links(page.read_text(), pages))
            results[nb] = {"page": pages[nb], "front_matter": fms[nb], "pandoc_stderr": r.stderr.strip(),
                           "render_error": f"pandoc failed:\n{r.stderr.strip()}" if r.returncode else None}
    return results


# ---------------------------------------------------------------- step 3: the browser

# What a reader sees on the page, gathered in the browser.
INSPECT_JS = """() => {
  const all = s => Array.from(document.querySelectorAll(s));
  const h1 = document.querySelector('header h1.title');
  const box = h1 ? h1.getBoundingClientRect() : null;
  const prose = document.body.cloneNode(true);  // visible prose: code, math and scripts removed
  prose.querySelectorAll('pre, code, math, script, style, svg, nav').forEach(e => e.remove());
  return {
    title: h1 ? h1.innerText.trim() : null,
    title_visible: !!box && box.width > 0 && box.height > 0,
    math: all('math').length,
    math_failed: all('span.math').filter(s => !s.querySelector('math')).map(s => s.textContent),
    images: all('img').map(i => ({src: i.getAttribute('src'), loaded: i.complete && i.naturalWidth > 0})),
    links: all('a[href]').filter(a => !a.closest('nav.preview-nav')).map(a => a.getAttribute('href')),
    badge: all('.colab-badge a').map(a => a.getAttribute('href')),
    text: prose.textContent,
  };
}"""


def inspect_pages(out: Path, results: dict) -> None:
    "Open each rendered page in headless Chromium, screenshot it and add what the reader sees to `results`."
    from playwright.sync_api import sync_playwright
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1100, "height": 900}, offline=True)
        page = browser.new_page()
        for nb, res in results.items():
            path = out / res["page"]
            if not path.exists(): continue
            page.goto(path.as_uri(), wait_until="load")
            res["seen"] = page.evaluate(INSPECT_JS)
            shot = out / "screenshots" / (Path(res["page"]).stem + ".png")
            page.screenshot(path=str(shot), full_page=True)
            res["screenshot"] = str(shot.relative_to(out))
        browser.close()


# ---------------------------------------------------------------- all together


def build(out: Path, browser: bool = True) -> dict:
    "Process, render and (with `browser`) inspect every notebook listed in nbs/sidebar.yml; writes out/report.json."
    out = Path(out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "screenshots").mkdir(parents=True)
    parts = sidebar_parts()
    notebooks = [nb for nb in sidebar_notebooks() if (NBS / nb).exists()]
    seconds, t = {}, time.perf_counter()
    processed = process_notebooks(notebooks)
    seconds["nbdev processing"], t = time.perf_counter() - t, time.perf_counter()
    results = render_pages([nb for nb in notebooks if not processed[nb]["error"]], out, parts)
    for nb, p in processed.items():
        results.setdefault(nb, {"page": page_name(nb)}).update(proc_error=p["error"], proc_warnings=p["warnings"])
    seconds["pandoc"], t = time.perf_counter() - t, time.perf_counter()
    if browser: inspect_pages(out, results)
    seconds["chromium"] = time.perf_counter() - t
    report = {"out": str(out), "seconds": {k: round(v, 1) for k, v in seconds.items()}, "notebooks": results}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "site-preview"), help="output folder (emptied first)")
    ap.add_argument("--no-browser", action="store_true", help="render only; no screenshots or browser facts")
    args = ap.parse_args(argv)
    report = build(Path(args.out), browser=not args.no_browser)
    for nb, res in report["notebooks"].items():
        state = res["proc_error"] or res.get("render_error") or "ok"
        warned = f" ({len(res['proc_warnings'])} nbdev warnings)" if res["proc_warnings"] else ""
        print(f"{nb:22} -> {res['page']:18} {state.splitlines()[0]}{warned}")
    print(f"pages, screenshots and report.json in {report['out']}; seconds: {report['seconds']}")
    return 1 if any(r["proc_error"] or r.get("render_error") for r in report["notebooks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
