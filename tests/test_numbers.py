"""Every measured figure a chapter's prose quotes is printed by that chapter's own outputs.

A "figure" here is a number written with a decimal point, a percentage or a ratio (`4.3×`): the kind of number a
measurement produces. Settings and counts (`top-2`, `16 heads`) are not checked. Numbers in math (`$...$`) and in
code spans are formulas or code, not quotations. A number the prose derives by hand rather than prints (say, a
worked example) is listed in an HTML comment in the same cell, `<!-- derived: 1.73 0.5 -->`, which the rendered
page does not show.
"""
import json
import re
from pathlib import Path

import pytest

NBS = sorted(p for p in (Path(__file__).parents[1] / "nbs").glob("*.ipynb"))
FIGURE = re.compile(r"(?<![\w.])(\d[\d,]*\.\d+|\d[\d,]*(?:\.\d+)?(?=\s?(?:%|×)))")
VERSION = r"(?i)\b(?:torch(?:_xla|_tpu)?|python|nbdev|cuda|jax|pandoc|quarto|numpy)\s+\d[\d.]*(?:\s*(?:to|and|–|-)\s*\d[\d.]*)?"
SKIP = [re.compile(p, re.S) for p in (r"\$\$.*?\$\$", r"\$[^$\n]*\$", r"`[^`\n]*`", r"<!--.*?-->", r"\]\([^)]*\)",
                                     r"https?://\S+", VERSION, r"\b\d+\.\d+\.\d+\b")]  # x.y.z: a version


def prose_figures(cell: dict) -> set:
    text = "".join(cell["source"])
    derived = {d for block in re.findall(r"<!--\s*derived:(.*?)-->", text, re.S) for d in block.split()}
    for pattern in SKIP: text = pattern.sub(" ", text)
    return {m.replace(",", "") for m in FIGURE.findall(text)} - {d.replace(",", "") for d in derived}


def output_text(nb: dict) -> str:
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            for kind in ("text/plain", "text/markdown", "text/html"):
                parts.append("".join(out.get("data", {}).get(kind, "")))
    return re.sub(r"(?<=\d),(?=\d{3})", "", "\n".join(parts))  # 1,024 and 1024 are the same figure


def printed(figure: str, outputs: str) -> bool:
    "Whether `figure` appears in the outputs, as printed or rounded from a longer printed value."
    if re.search(rf"(?<![\d.]){re.escape(figure)}(?!\d)", outputs): return True
    if "." not in figure: return False
    decimals = len(figure.split(".")[1])
    return any(f"{float(v):.{decimals}f}" == figure for v in re.findall(r"(?<![\d.])\d+\.\d{%d,}" % (decimals + 1), outputs))


@pytest.mark.parametrize("path", NBS, ids=[p.stem for p in NBS])
def test_every_quoted_figure_is_printed(path):
    "A chapter quotes its own outputs; the front page summarises the book, so it may quote any chapter's."
    nb = json.loads(path.read_text())
    outputs = "\n".join(output_text(json.loads(p.read_text())) for p in NBS) if path.stem == "index" else output_text(nb)
    missing = sorted({f for c in nb["cells"] if c["cell_type"] == "markdown" for f in prose_figures(c) if not printed(f, outputs)})
    assert not missing, f"{path.name}: figures in the prose that no output prints: {missing}"
