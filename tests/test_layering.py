"""The layers point one way: the library (``flexattn_jax`` outside ``app/``) imports nothing from ``convert``,
``train``, ``bench`` or the application layer; ``convert`` and ``train`` never import ``app`` or ``bench``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = "flexattn_jax.app"


def _imports(path: Path, package: str | None = None) -> set[str]:
    """Every module a file imports, at the top or inside functions (relative imports resolved against ``package``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = package or ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from flexattn_jax import app` is an app import
    return out


def _offenders(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for f in files:
        for mod in sorted(_imports(f)):
            if any(mod == p or mod.startswith(p + ".") for p in forbidden):
                bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    return bad


def _library_files() -> list[Path]:
    return [f for f in (ROOT / "flexattn_jax").rglob("*.py") if "app" not in f.relative_to(ROOT / "flexattn_jax").parts]


def test_library_imports_nothing_above_it():
    assert _library_files(), "no library files found"
    assert _offenders(_library_files(), ("convert", "train", "bench", APP)) == []


@pytest.mark.parametrize("package", ["convert", "train"])
def test_convert_and_train_never_import_app_or_bench(package):
    files = list((ROOT / package).rglob("*.py"))
    assert files
    assert _offenders(files, ("bench", APP)) == []


def test_nothing_but_tests_imports_bench():
    files = [f for d in ("flexattn_jax", "convert", "train") for f in (ROOT / d).rglob("*.py")]
    assert _offenders(files, ("bench",)) == []


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The rule would catch an import hidden in a function, and a relative one."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from train.loop import train\n    from .app import cli\n")
    found = _imports(probe, package="flexattn_jax")
    assert {"train.loop", "flexattn_jax.app", "flexattn_jax.app.cli"} <= found


def test_importing_the_model_loads_no_upper_layer():
    code = ("import sys, flexattn_jax.model, flexattn_jax.generate, flexattn_jax.checkpoint, flexattn_jax.flops\n"
            "upper = ('convert', 'train', 'bench')\n"
            "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in upper or m.startswith('flexattn_jax.app')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""


def test_public_api_resolves():
    import flexattn_jax as fx

    for name in fx.__all__:
        assert getattr(fx, name) is not None, name
    from flexattn_jax.checkpoint import load_converted

    assert fx.load_checkpoint is load_converted
    submodules = {f.stem for f in (ROOT / "flexattn_jax").glob("*.py")} | {"app"}
    assert not submodules & set(fx.__all__)  # an export must never shadow a module of the package
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fx.nope  # noqa: B018


def test_readme_api_example_runs(tmp_path):
    """The README's Python API example, run as written on a tiny checkpoint (paths substituted)."""
    import re

    import numpy as np
    from PIL import Image

    from tests.checkpoints import write_tiny_checkpoint
    from tests.fixtures import tiny_config

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## The Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    ckpt = write_tiny_checkpoint(tmp_path / "model")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    cfg = tiny_config()
    ids = [1, 5, *[cfg.image_token_id] * cfg.num_image_tokens, 7, 9]  # the <image> placeholder expanded, as forward takes it
    env = {"input_ids": np.array([ids], np.int32),
           "pixel_values": np.zeros((1, cfg.image_size, cfg.image_size, 3), np.float32), "print": lambda *a: None}
    exec(code.replace("demo_out/model", str(ckpt)).replace("cat.png", str(tmp_path / "cat.png")), env)  # noqa: S102
    assert env["logits"].shape == (1, len(ids), cfg.text.vocab_size)
    assert isinstance(env["a"].text, str) and env["a"].error is None
