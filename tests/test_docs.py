"""The README and the manual in docs/: every relative link resolves (file and anchor), every path under docs/ that
the code names exists, the README's quick start parses, and every Python snippet of the README, docs/inference.md and
the package docstring runs as written in a fresh interpreter on a tiny checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import flexattn_jax

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_DIRS = ("flexattn_jax", "convert", "train", "bench", "tests")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SNIPPET_PAGES = [ROOT / "README.md", ROOT / "docs" / "inference.md"]  # the API's pages (others may quote fragments)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    out: set[str] = set()
    for m in re.finditer(r"^#{1,6} (.+)$", text, re.M):
        base = _slug(m.group(1))
        slug, n = base, 0
        while slug in out:  # a repeated heading gets -1, -2, ...
            n += 1
            slug = f"{base}-{n}"
        out.add(slug)
    out.update(re.findall(r"<a id=\"([^\"]+)\"></a>", text))
    return out


def test_manual_pages_exist():
    names = {p.name for p in PAGES}
    for page in ("index.md", "inference.md", "serving.md", "evaluation.md", "training.md", "compile.md", "design.md",
                 "benchmarks.md", "demo.md", "reliability.md"):
        assert page in names, page
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150  # a front page, not the manual


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in _LINK.findall(_FENCE.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest)):
            bad.append(f"{target}: no anchor #{anchor} in {dest.name}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_docs_paths_named_in_the_code_exist():
    """Every path under docs/ that a source file names, and every markdown file it cites, is a file of the repository."""
    bad = []
    for d in CODE_DIRS:
        for f in sorted((ROOT / d).rglob("*.py")):
            text = f.read_text()
            for name in re.findall(r"(?<![\w/])docs/[\w.-][\w./-]*", text):
                name = name.rstrip(".")
                if not (ROOT / name).exists():
                    bad.append(f"{f.relative_to(ROOT)}: {name}")
            for name in re.findall(r"(?<![\w/.-])([\w-]+\.md)\b", text):
                if not ((ROOT / name).exists() or (ROOT / "docs" / name).exists()):
                    bad.append(f"{f.relative_to(ROOT)}: {name}")
    assert not bad, bad


def _snippets() -> list[tuple[str, str]]:
    out = [(f"{p.relative_to(ROOT)}[{i}]", code) for p in SNIPPET_PAGES for i, code in enumerate(_SNIPPET.findall(p.read_text()))]
    out += [(f"flexattn_jax/__init__.py[{i}]", code) for i, code in enumerate(_SNIPPET.findall(flexattn_jax.__doc__))]
    return out


@pytest.mark.slow
def test_every_python_snippet_runs(tmp_path):
    """Each ```python block of the README, docs/inference.md and the package docstring, run as written in its own
    fresh interpreter, in a directory where ``demo_out/model`` is a tiny checkpoint and ``image.png`` an image."""
    from PIL import Image

    from tests.checkpoints import write_tiny_checkpoint

    snippets = _snippets()
    names = [name for name, _ in snippets]
    assert {n.split("[")[0] for n in names} == {"README.md", "docs/inference.md", "flexattn_jax/__init__.py"}, names
    write_tiny_checkpoint(tmp_path / "demo_out" / "model")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # snippets that finish first leave their programs to the others
    procs = [(name, subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)) for name, code in snippets]
    failed = []
    for name, p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            failed.append(f"{name} (exit {p.returncode}):\n{err[-2000:]}")
    assert not failed, "\n\n".join(failed)


def test_readme_quick_start_commands_parse(tmp_path, monkeypatch, capsys):
    """Each command of the README's quick start is accepted by the current CLI: run where none of its inputs
    exist, it stops at the first missing input with a one-line error, not at an unknown option or command."""
    import shlex

    from flexattn_jax.app.cli import main

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"^## Quick start.*?^```bash\n(.*?)^```", readme, re.S | re.M).group(1)
    lines = [ln for ln in block.splitlines() if ln.startswith("flexattn-jax ")]
    assert {ln.split()[1] for ln in lines} >= {"convert", "generate", "eval", "train", "serve"}, lines
    monkeypatch.chdir(tmp_path)
    for line in lines:
        try:
            rc = main(shlex.split(line)[1:])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc not in (0, None), line
        assert not re.search(r"unrecognized arguments|invalid choice|required|unknown command|usage:", err), (line, err)
        assert re.search(r"error: .*(ckpt/flexattn-7b|LLaVA-FlexAttn-7B|data/vstar_bench|images)", err), (line, err)
    assert not any(tmp_path.iterdir())  # nothing written
