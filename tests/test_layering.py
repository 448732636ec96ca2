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


_API_CALLS = r"""
import sys
import numpy as np
import jax
import flexattn_jax as fx

assert "flexattn_jax.app" not in sys.modules and "flexattn_jax.generate" not in sys.modules  # nothing loaded eagerly
from tests.fixtures import random_params, tiny_config
used = set()
def use(name):
    used.add(name)
    return getattr(fx, name)

cfg = tiny_config()
assert isinstance(cfg, use("ModelConfig"))
assert isinstance(cfg.vision, use("VisionConfig")) and isinstance(cfg.text, use("TextConfig"))
assert isinstance(cfg.projector, use("ProjectorConfig")) and isinstance(cfg.flex, use("FlexConfig"))
assert use("apply_overrides")(cfg, ["flex.threshold=7"]).flex.threshold == 7
try:
    fx.apply_overrides(cfg, ["flex.nope=1"])
    raise SystemExit("an unknown field was accepted")
except use("ConfigError") as e:
    assert "nope" in str(e), e
hf = {"model_type": "llava", "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
      "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
      "image_size": 28, "patch_size": 14}, "image_token_index": 4}
assert use("from_hf_config")(hf).text.num_layers == 2
init = use("init_params")(cfg, jax.random.key(0))
params = random_params(cfg, seed=1)
assert jax.tree.structure(init) == jax.tree.structure(params)
d = sys.argv[1] + "/model"
from flexattn_jax.app.demo_data import build_demo_tokenizer
use("write_model")(params, cfg, d, {"source": "api test"},
                   lambda p: [f.rsplit("/", 1)[-1] for f in build_demo_tokenizer().save_pretrained(str(p))])
loaded, cfg2 = use("load_checkpoint")(d)
assert cfg2 == cfg and jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), loaded, params))
try:
    fx.load_checkpoint(d + "-missing")
    raise SystemExit("a missing checkpoint was loaded")
except (use("CheckpointError"), FileNotFoundError) as e:
    assert "missing" in str(e), e
tok = use("load_tokenizer")(d)
assert use("make_mesh")("data=2").shape["data"] == 2
ids = np.array([[1, 5, *[cfg.image_token_id] * cfg.num_image_tokens, 7, 9]], np.int32)
pixels = np.zeros((1, cfg.image_size, cfg.image_size, 3), np.float32)
assert use("forward")(params, cfg, ids, pixels).logits.shape == (1, ids.shape[1], cfg.text.vocab_size)
gen = fx.generate.generate(params, cfg, ids, pixels, np.ones(ids.shape, bool), max_new_tokens=3)  # the module, lazily
assert gen.tokens.shape == (1, 3)
from PIL import Image
img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
reqs = [use("Request")(img, "What is it?"), fx.Request(None, "no image")]
answers = use("answer")(params, cfg, tok, reqs, max_new_tokens=3)
assert isinstance(answers[0], use("Answer")) and answers[0].error is None and isinstance(answers[0].text, str)
assert answers[1].error and "no image" in answers[1].error, answers[1]
streamed = dict(use("stream_answers")(params, cfg, tok, reqs, use("GenerationOptions")(max_new_tokens=3)))
assert streamed[0].tokens == answers[0].tokens and streamed[1].error == answers[1].error
missing = set(fx.__all__) - used
assert not missing, f"exports the test does not call: {sorted(missing)}"
print("ok")
"""


@pytest.mark.slow
def test_public_api_calls(tmp_path):
    """Every name of ``flexattn_jax.__all__`` and the lazily imported ``fx.generate`` module, called in a fresh interpreter."""
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", _API_CALLS, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    import flexattn_jax as fx
    from flexattn_jax.checkpoint import load_converted

    assert fx.load_checkpoint is load_converted
    submodules = {f.stem for f in (ROOT / "flexattn_jax").glob("*.py")} | {"app"}
    assert not submodules & set(fx.__all__)  # an export must never shadow a module of the package
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fx.nope  # noqa: B018
