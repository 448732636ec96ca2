"""Hostile inputs to the CLIs (issue 17), one table: each row is a bad input or condition and what must happen.

Every case asserts: the exit status; the error message (a regex that names the file / key / flag / value,
on one line unless the row says otherwise); no traceback; the inputs untouched and nothing written but
what the row allows (every file under the test's directory is hashed before and after); and, unless the
row is allowed to, that neither a converted model was restored nor a PyTorch checkpoint read, i.e. the
check ran before any work. Cases run the commands in-process (``flexattn_jax.app.cli.main``) on tiny models.

Rows are appended to :data:`CASES` (other issues' cases go at the end); ``KINDS`` are the issue's classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

KINDS = ("destroyed", "lost", "memory", "values", "culprit")
UNWRITABLE = "/proc/flexattn-hostile"  # nothing can be created under /proc, not even by root
GEN = ("--max-new-tokens", "2", "--batch-size", "4")
EXTRA = "zoom_ratio:3#warmup:10#lowres_size:56#highres_size:168#threshold:48"


@dataclass(frozen=True)
class World:
    """The shared inputs: a PyTorch checkpoint, a converted one, images and a batch file."""

    root: Path
    src: Path  # llava-hf (transformers 5) directory: config.json + model.safetensors
    ckpt: Path  # converted directory: params/ + metadata.json + tokenizer
    img: Path  # a good image
    batch: Path  # a JSONL of good items


@dataclass(frozen=True)
class Case:
    """One hostile input. ``argv`` is a command line for ``flexattn_jax.app.cli.main`` with ``{src}``, ``{ckpt}``,
    ``{img}``, ``{batch}``, ``{root}`` and ``{case}`` (a fresh directory per case) filled in, or a callable
    ``(world, case_dir) -> (exit, stdout, stderr)``. ``setup(world, case_dir)`` writes the case's own inputs.
    ``creates`` lists the paths (templates) allowed to appear; ``loads`` allows restoring / reading weights.
    ``check(world, case_dir, out, err)`` adds assertions (e.g. the good items were answered)."""

    name: str
    kind: str
    argv: tuple[str, ...] | Callable
    exit: int
    msg: str | None
    setup: Callable | None = None
    creates: tuple[str, ...] = ()
    one_line: bool = True
    loads: bool = False
    check: Callable | None = None


# ---- the shared inputs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("hostile"))


def make_world(root: Path) -> World:
    """The shared inputs in ``root``: tiny PyTorch and converted checkpoints, an image, a batch of two good items."""
    import safetensors.torch

    from tests.checkpoints import write_tiny_checkpoint
    from tests.torch_models import make_tiny_llava

    model = make_tiny_llava(layers=2, seed=0)
    src = root / "src"
    src.mkdir()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    model.config.to_json_file(src / "config.json")
    ckpt = write_tiny_checkpoint(root / "ckpt", seed=2, std=0.3)
    img = root / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(img)
    batch = root / "batch.jsonl"
    batch.write_text("".join(json.dumps({"image": str(img), "prompt": q}) + "\n" for q in ("what is it?", "which pattern?")))
    return World(root, src, ckpt, img, batch)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _fill(text: str, world: World, case_dir: Path) -> str:
    return text.format(src=world.src, ckpt=world.ckpt, img=world.img, batch=world.batch, root=world.root, case=case_dir)


# ---- helpers the rows use ----------------------------------------------------------------------

def _src_config(world: World, case: Path, **changes) -> Path:
    """A copy of the PyTorch checkpoint with its text_config fields changed (``extra`` at the top level)."""
    d = case / "src"
    shutil.copytree(world.src, d)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        (cfg if k == "extra" else cfg["text_config"])[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _src_raw(world: World, case: Path, raw: bytes) -> Path:
    """A copy of the PyTorch checkpoint with config.json replaced by ``raw`` bytes."""
    d = case / "src"
    shutil.copytree(world.src, d)
    (d / "config.json").write_bytes(raw)
    return d


def _src_tensor(world: World, case: Path, key: str, fn) -> Path:
    """A copy of the PyTorch checkpoint with tensor ``key`` replaced by ``fn(tensor)``."""
    import safetensors.torch

    d = case / "src"
    shutil.copytree(world.src, d)
    sd = safetensors.torch.load_file(d / "model.safetensors")
    sd[key] = fn(sd[key])
    safetensors.torch.save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _src_index(world: World, case: Path, shard: str) -> Path:
    """A sharded copy whose index sends one tensor to ``shard`` (a path outside the directory)."""
    import safetensors.torch

    d = case / "src"
    d.mkdir()
    shutil.copy(world.src / "config.json", d)
    shutil.copy(world.src / "model.safetensors", d / "model-00001-of-00001.safetensors")
    keys = list(safetensors.torch.load_file(world.src / "model.safetensors"))
    weight_map = dict.fromkeys(keys, "model-00001-of-00001.safetensors")
    weight_map[keys[0]] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (case / "evil.safetensors").write_bytes((world.src / "model.safetensors").read_bytes())  # it exists: still refused
    return d


def _ckpt_copy(world: World, case: Path, tokenizer: bool = True, params: bool = True) -> Path:
    d = case / "ckpt"
    shutil.copytree(world.ckpt, d, ignore=None if tokenizer else shutil.ignore_patterns("tokenizer*", "special_tokens*", "chat_*"))
    if not params:
        shutil.rmtree(d / "params")
    return d


def _ckpt_meta(world: World, case: Path, text: str | None = None, **cfg_changes) -> Path:
    """A converted copy with metadata.json replaced by ``text`` or with model_config.text fields changed."""
    d = _ckpt_copy(world, case)
    if text is None:
        meta = json.loads((d / "metadata.json").read_text())
        meta["model_config"]["text"].update(cfg_changes)
        text = json.dumps(meta)
    (d / "metadata.json").write_text(text)
    return d


def _truncate_params(world: World, case: Path) -> Path:
    """A converted copy whose largest array-data file lost two thirds of its bytes (an interrupted copy)."""
    d = _ckpt_copy(world, case)
    data = max((p for p in (d / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    return d


def _ckpt_bytes(world: World, case: Path, raw: bytes) -> Path:
    d = _ckpt_copy(world, case)
    (d / "metadata.json").write_bytes(raw)
    return d


def _vocab_mismatch(world: World, case: Path) -> Path:
    """A converted directory whose model has 200 embedding rows, with the 484-token tokenizer."""
    from flexattn_jax.checkpoint import CONVERTER_VERSION, FORMAT
    from tests.fixtures import tiny_config

    d = case / "small-vocab"
    d.mkdir()
    (d / "metadata.json").write_text(json.dumps({"format": FORMAT, "converter_version": CONVERTER_VERSION,
                                                 "model_config": tiny_config(vocab_size=200).to_dict()}))
    for f in world.ckpt.iterdir():
        if f.is_file() and f.name != "metadata.json":
            shutil.copy(f, d)
    return d


def _png(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    Image.new(mode, size).save(path)
    return path


def _library(fn: Callable) -> Callable:
    """A row that calls a library function: a PreprocessError becomes exit 2 with ``error: ...`` on stderr."""

    def run(world: World, case: Path):
        from flexattn_jax.preprocess import PreprocessError

        try:
            fn(world, case)
        except PreprocessError as e:
            return 2, "", f"error: {e}\n"
        return 0, "", ""

    return run


def _load_bounded(world: World, case: Path) -> None:
    """A 30000x1 PNG (the issue's 3.9 GB image): refused, and the refusal itself allocates almost nothing."""
    from flexattn_jax.preprocess import load_image

    path = case / "line.png"
    tracemalloc.start()
    try:
        load_image(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 5e6, peak


def _load(path: Path) -> None:
    from flexattn_jax.preprocess import load_image

    load_image(path)


def _poke(t, value: float):
    """``t`` with its first element set to ``value``."""
    t = t.clone()
    t.view(-1)[0] = value
    return t


def _answers(n_ok: int, n_err: int, err: str) -> Callable:
    """Check the --output JSONL: ``n_ok`` answered items and ``n_err`` errors matching ``err``."""

    def check(world: World, case: Path, out: str, stderr: str) -> None:
        rows = [json.loads(line) for line in (case / "out.jsonl").read_text().splitlines()[1:]]  # after the header
        ok = [r for r in rows if r["error"] is None and r["answer"] is not None]
        bad = [r for r in rows if r["error"] is not None]
        assert len(ok) == n_ok and len(bad) == n_err, rows
        assert all(re.search(err, r["error"]) for r in bad), bad

    return check


def _hostile_batch(world: World, case: Path) -> None:
    line = _png(case / "line.png", (30000, 1))
    tall = _png(case / "tall.png", (2, 3000))
    items = [(world.img, "what is it?"), (line, "what is it?"), (tall, "what is it?"), (world.img, "which pattern?")]
    (case / "in.jsonl").write_text("".join(json.dumps({"image": str(i), "prompt": p}) + "\n" for i, p in items))


def _link_batch(world: World, case: Path) -> None:
    (case / "link.jsonl").symlink_to(world.batch)


def _report(text: str) -> Callable:
    def setup(world: World, case: Path) -> None:
        (case / "bench.json").write_text(text)

    return setup


# ---- issue 24: resume, exit codes, the last tracebacks ----------------------------------------------

def _header(world: World, batch: Path, *flags: str, ckpt: Path | None = None) -> str:
    """The header line generate writes for ``--batch batch`` with ``flags`` (built by the command's own functions)."""
    from flexattn_jax.app.generate_cli import answer_settings, generate_parser
    from flexattn_jax.app.resume import checkpoint_fingerprint, input_identity, make_header

    args = generate_parser().parse_args(["--checkpoint", str(ckpt or world.ckpt), "--batch", str(batch), *flags])
    header = make_header("generate answers", checkpoint=checkpoint_fingerprint(args.checkpoint), settings=answer_settings(args),
                         input=input_identity(batch))
    return json.dumps(header, sort_keys=True) + "\n"


def _answers_of(world: World, case: Path, batch: Path, n: int, *flags: str, ckpt: Path | None = None) -> None:
    """``case/out.jsonl``: a header for ``batch`` and ``flags``, then ``n`` answer records."""
    rows = [json.dumps({"index": i, "line": i + 1, "image": str(world.img), "prompt": f"q{i}", "answer": "a", "error": None,
                        "image_sha256": "0" * 64}) + "\n" for i in range(n)]
    (case / "out.jsonl").write_text(_header(world, batch, *flags, ckpt=ckpt) + "".join(rows))


def _other_batch(world: World, case: Path) -> None:
    other = case / "other.jsonl"
    other.write_text("".join(json.dumps({"image": str(world.img), "prompt": f"q{i}"}) + "\n" for i in range(26)))
    _answers_of(world, case, other, 26, *GEN)


def _other_params(world: World, case: Path) -> None:
    """A checkpoint copy with other parameter values, and an answers file written with the original."""
    from flexattn_jax.checkpoint import save_params
    from tests.fixtures import random_params, tiny_config

    d = _ckpt_copy(world, case)
    shutil.rmtree(d / "params")
    save_params(random_params(tiny_config(), seed=3, std=0.3), d / "params")
    _answers_of(world, case, world.batch, 2, *GEN)


def _image_replaced(world: World, case: Path):
    """Answer a batch, replace its image file at the same path, resume: the item is answered again (its hash changed)."""
    import contextlib
    import io

    from flexattn_jax.app.cli import main

    img, batch, out = case / "img.png", case / "in.jsonl", case / "out.jsonl"
    shutil.copy(world.img, img)
    batch.write_text(json.dumps({"image": str(img), "prompt": "what is it?"}) + "\n")
    argv = ["generate", "--checkpoint", str(world.ckpt), "--batch", str(batch), "--output", str(out), *GEN]
    assert main(argv) == 0
    first = json.loads(out.read_text().splitlines()[1])
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(img)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*argv, "--resume"])
    rows = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    assert len(rows) == 1 and rows[0]["image_sha256"] == hashlib.sha256(img.read_bytes()).hexdigest() != first["image_sha256"]
    assert "already done" not in err.getvalue()
    return code, "", err.getvalue()


def _no_data_offsets(world: World, case: Path) -> Path:
    """A copy of the PyTorch checkpoint whose safetensors header lost one tensor's data_offsets (same header length)."""
    import struct

    d = case / "src"
    shutil.copytree(world.src, d)
    raw = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    del header[sorted(k for k in header if k != "__metadata__")[0]]["data_offsets"]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    (d / "model.safetensors").write_bytes(raw[:8] + text.ljust(n) + raw[8 + n:])
    return d


def _vqa_data(world: World, case: Path) -> None:
    lines = [json.dumps({"question_id": i, "image": f"img{i}.png", "question": "Is it red?", "answers": ["no"]}) for i in range(2)]
    (case / "vqa.jsonl").write_text("\n".join(lines) + "\n")


def _eval_nothing_scored(world: World, case: Path, out: str, err: str) -> None:
    m = json.loads((case / "eval" / "metrics.json").read_text())
    assert (m["items"], m["scored"], m["failed"], m["accuracy"], m["accuracy_scored"]) == (2, 0, 2, 0.0, None)
    assert "accuracy                    0.00 %  over all 2 items, failed ones as wrong (0 scored" in out


def _foreign_predictions(world: World, case: Path) -> None:
    _vqa_data(world, case)
    (case / "eval").mkdir()
    (case / "eval" / "predictions.jsonl").write_bytes(b'{"keep": true}')


# ---- the table ---------------------------------------------------------------------------------

C, G = "convert", "generate"
CASES: list[Case] = [
    # data destroyed: an output that is, contains or lies inside an input
    Case("convert OUT is SRC", "destroyed", (C, "{src}", "{src}", "--overwrite"), 2, r"OUT \S*src is the input \S*src"),
    Case("convert OUT contains SRC", "destroyed", (C, "{src}", "{root}", "--overwrite"), 2, r"OUT \S+ contains the input \S*src"),
    Case("convert OUT inside SRC", "destroyed", (C, "{src}", "{src}/out", "--overwrite"), 2, r"OUT \S*src/out lies inside the input"),
    Case("convert OUT links to SRC", "destroyed", (C, "{src}", "{case}/link", "--overwrite"), 2, r"OUT \S*link is the input \S*src",
         setup=lambda w, c: (c / "link").symlink_to(w.src)),
    Case("convert OUT is the vision tower", "destroyed", (C, "{src}", "{case}/clip", "--vision-tower", "{case}/clip", "--overwrite"),
         2, r"OUT \S*clip is the input", setup=lambda w, c: (c / "clip").mkdir()),
    Case("convert --to-hf is SRC", "destroyed", (C, "{src}", "{case}/out", "--to-hf", "{src}", "--overwrite"), 2,
         r"--to-hf \S*src is the input"),
    Case("convert --to-hf contains SRC", "destroyed", (C, "{src}", "{case}/out", "--to-hf", "{root}", "--overwrite"), 2,
         r"--to-hf \S+ contains the input \S*src"),
    Case("convert --to-hf is OUT", "destroyed", (C, "{src}", "{case}/out", "--to-hf", "{case}/out"), 2,
         r"--to-hf \S*out is the input \S*out"),
    Case("export OUT_HF is the converted dir", "destroyed", (C, "export", "{ckpt}", "{ckpt}", "--overwrite"), 2,
         r"OUT_HF \S*ckpt is the input"),
    Case("export OUT_HF contains it", "destroyed", (C, "export", "{ckpt}", "{root}", "--overwrite"), 2,
         r"OUT_HF \S+ contains the input \S*ckpt"),
    Case("export OUT_HF inside it", "destroyed", (C, "export", "{ckpt}", "{ckpt}/hf"), 2, r"OUT_HF \S*ckpt/hf lies inside the input"),
    Case("generate --output is --batch", "destroyed", (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--output", "{batch}"), 2,
         r"--output \S*batch\.jsonl is the input"),
    Case("generate --output links to --batch", "destroyed",
         (G, "--checkpoint", "{ckpt}", "--batch", "{case}/link.jsonl", "--output", "{batch}"), 2, r"--output \S*batch\.jsonl is the input",
         setup=_link_batch),
    Case("generate --output into the checkpoint", "destroyed",
         (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--output", "{ckpt}/metadata.json"), 2,
         r"--output \S*metadata\.json lies inside"),
    # finished work lost: every output path checked before the model is loaded
    Case("generate --output in a missing directory", "lost",
         (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--output", "{case}/nodir/out.jsonl"), 2,
         r"--output \S*nodir/out\.jsonl: the directory \S*nodir does not exist"),
    Case("generate --output is a directory", "lost", (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--output", "{case}"), 2,
         r"--output \S+ is a directory"),
    Case("generate --output unwritable", "lost", (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--output", UNWRITABLE + "/o.jsonl"),
         2, r"--output /proc/\S+: (cannot write in|the directory)"),
    Case("generate --save-attention onto a file", "lost",
         (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--save-attention", "{img}"), 2,
         r"--save-attention \S*good\.png exists and is not a directory"),
    Case("generate --save-attention unwritable", "lost",
         (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--save-attention", UNWRITABLE), 2,
         r"--save-attention /proc/\S+: cannot write"),
    Case("generate --save-attention under a file", "lost",
         (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--save-attention", "{img}/maps"), 2,
         r"--save-attention \S+: \S*good\.png is not a directory"),
    Case("convert OUT unwritable", "lost", (C, "{src}", UNWRITABLE), 2, r"OUT /proc/\S+: cannot write"),
    Case("convert OUT under a file", "lost", (C, "{src}", "{img}/out"), 2, r"OUT \S+: \S*good\.png is not a directory"),
    Case("convert OUT exists", "lost", (C, "{src}", "{ckpt}"), 2, r"OUT \S*ckpt already exists \(pass --overwrite"),
    Case("convert --to-hf unwritable", "lost", (C, "{src}", "{case}/out", "--to-hf", UNWRITABLE), 2, r"--to-hf /proc/\S+: cannot write"),
    Case("convert --to-hf config checked before OUT", "lost", (C, "{src}", "{case}/out", "--to-hf", "{case}/hf", "--image-token-id", "-5",
                                                               "--no-progress"), 2, r"image_token_id=-5", loads=True),
    Case("export OUT_HF unwritable", "lost", (C, "export", "{ckpt}", UNWRITABLE), 2, r"OUT_HF /proc/\S+: cannot write"),
    Case("export config checked before restoring", "lost", (C, "export", "{ckpt}", "{case}/hf", "--layout", "hf5",
                                                            "--image-token-id", "-7"), 2, r"image_token_id=-7"),
    # memory on hostile images
    Case("30000x1 PNG refused cheaply", "memory", _library(_load_bounded), 2, r"line\.png: 30000x1 has an aspect ratio of 30000:1",
         setup=lambda w, c: _png(c / "line.png", (30000, 1))),
    Case("60000x1 image in memory", "memory", _library(lambda w, c: __import__("flexattn_jax.preprocess").preprocess.preprocess_image(
        Image.new("RGB", (60000, 1)), 336)), 2, r"60000x1 has an aspect ratio of 60000:1, more than the limit of 100:1"),
    Case("100 M pixel PNG", "memory", _library(lambda w, c: _load(c / "big.png")), 2,
         r"big\.png: 10000x10000 is 100,000,000 pixels, more than the limit of 89,478,485",
         setup=lambda w, c: _png(c / "big.png", (10000, 10000), "1")),
    Case("225 M pixel PNG (PIL's bomb error)", "memory", _library(lambda w, c: _load(c / "bomb.png")), 2, r"bomb\.png: .*225000000 pixels",
         setup=lambda w, c: _png(c / "bomb.png", (15000, 15000), "1")),
    Case("batch with absurd images: the good items answered", "memory",
         (G, "--checkpoint", "{ckpt}", "--batch", "{case}/in.jsonl", "--output", "{case}/out.jsonl", *GEN), 0, None,
         setup=_hostile_batch, creates=("{case}/out.jsonl",), loads=True,
         check=_answers(2, 2, r"(line|tall)\.png: \d+x\d+ has an aspect ratio of \d+:1, more than the limit")),
    # values and types checked where they enter
    Case("convert int32 q_proj", "values", (C, "{case}/src", "{case}/out", "--no-progress"), 2,
         r"model\.language_model\.layers\.0\.self_attn\.q_proj\.weight: I32, but text/layers/attn/q/kernel is a floating-point parameter",
         setup=lambda w, c: _src_tensor(w, c, "model.language_model.layers.0.self_attn.q_proj.weight", lambda t: (t * 1000).int()),
         one_line=False, loads=True),
    Case("convert bool norm weight", "values", (C, "{case}/src", "{case}/out", "--no-progress"), 2, r"norm\.weight: BOOL, but",
         setup=lambda w, c: _src_tensor(w, c, "model.language_model.norm.weight", lambda t: t > 0), one_line=False, loads=True),
    Case("convert all-NaN weight", "values", (C, "{case}/src", "{case}/out", "--no-progress"), 2,
         r"non-finite weights \(pass --allow-nonfinite.*\): \S+: model\.language_model\.layers\.1\.mlp\.up_proj\.weight: 8192 of 8192",
         setup=lambda w, c: _src_tensor(w, c, "model.language_model.layers.1.mlp.up_proj.weight", lambda t: t * float("nan")), loads=True),
    Case("convert inf after the cast to float16", "values", (C, "{case}/src", "{case}/out", "--no-progress", "--dtype", "float16"), 2,
         r"lm_head\.weight: 1 of \d+ values are NaN or infinite \(as float16\)",
         setup=lambda w, c: _src_tensor(w, c, "lm_head.weight", lambda t: _poke(t, 1e6)),
         loads=True),
    Case("convert --allow-nonfinite", "values", (C, "{case}/src", "{case}/out", "--no-progress", "--allow-nonfinite"), 0, None,
         setup=lambda w, c: _src_tensor(w, c, "model.language_model.norm.weight", lambda t: t * float("inf")), loads=True,
         creates=("{case}/out",)),
    Case("convert --set flex.threshold=abc", "values", (C, "{src}", "{case}/out", "--set", "flex.threshold=abc"), 2,
         r"flex\.threshold='abc': expected a number", loads=True),
    Case("convert --set text.num_layers=abc", "values", (C, "{src}", "{case}/out", "--set", "text.num_layers=abc"), 2,
         r"text\.num_layers='abc': expected an integer", loads=True),
    Case("convert --set text.vocab_size=0", "values", (C, "{src}", "{case}/out", "--set", "text.vocab_size=0"), 2,
         r"text\.vocab_size=0 must be positive", loads=True),
    Case("convert --set projector.type=conv", "values", (C, "{src}", "{case}/out", "--set", "projector.type=conv"), 2,
         r"projector\.type='conv': use one of 'mlp2x_gelu', 'linear'", loads=True),
    Case("config.json num_attention_heads 0", "values", (C, "{case}/src", "{case}/out"), 2,
         r"config\.json \(\S+\).*text\.num_heads=0 \(num_attention_heads in config\.json\) must be positive",
         setup=lambda w, c: _src_config(w, c, num_attention_heads=0), loads=True),
    Case("config.json vocab_size 0", "values", (C, "{case}/src", "{case}/out"), 2, r"text\.vocab_size=0 must be positive",
         setup=lambda w, c: _src_config(w, c, vocab_size=0), loads=True),
    Case("config.json hidden_size '64'", "values", (C, "{case}/src", "{case}/out"), 2, r"text\.hidden_size='64': must be an integer",
         setup=lambda w, c: _src_config(w, c, hidden_size="64"), loads=True),
    Case("config.json hidden_size [64]", "values", (C, "{case}/src", "{case}/out"), 2, r"text\.hidden_size=\[64\]: must be an integer",
         setup=lambda w, c: _src_config(w, c, hidden_size=[64]), loads=True),
    Case("config.json num_hidden_layers -2 (FlexAttention)", "values", (C, "{case}/src", "{case}/out"), 2,
         r"text\.num_layers=-2 \(num_hidden_layers in config\.json\) must be positive",
         setup=lambda w, c: _src_config(w, c, num_hidden_layers=-2, extra=EXTRA), loads=True),
    Case("config.json a JSON list", "values", (C, "{case}/src", "{case}/out"), 2, r"src/config\.json: expected a JSON object, got list",
         setup=lambda w, c: _src_raw(w, c, b"[1, 2]"), loads=True),
    Case("config.json not UTF-8", "culprit", (C, "{case}/src", "{case}/out"), 2, r"src/config\.json: 'utf-8' codec can't decode",
         setup=lambda w, c: _src_raw(w, c, b'{"a": "\xff"}'), loads=True),
    Case("index shard ../", "values", (C, "{case}/src", "{case}/out"), 2,
         r"model\.safetensors\.index\.json names shard\(s\) outside \S*src, refused: \['\.\./evil\.safetensors'\]",
         setup=lambda w, c: _src_index(w, c, "../evil.safetensors"), loads=True),
    Case("index shard absolute", "values", (C, "{case}/src", "{case}/out"), 2, r"names shard\(s\) outside .*evil\.safetensors",
         setup=lambda w, c: _src_index(w, c, str(c / "evil.safetensors")), loads=True),
    Case("generate --hr-budget abc", "values", (G, "--checkpoint", "{ckpt}", "--image", "{img}", "--prompt", "hi", "--hr-budget", "abc"),
         2, r"--hr-budget 'abc': use a count"),
    Case("generate --hr-budget 0", "values", (G, "--checkpoint", "{ckpt}", "--image", "{img}", "--prompt", "hi", "--hr-budget", "0"),
         2, r"--hr-budget '0': use a count >= 1"),
    Case("generate --hr-budget 1.5", "values", (G, "--checkpoint", "{ckpt}", "--image", "{img}", "--prompt", "hi", "--hr-budget", "1.5"),
         2, r"--hr-budget '1\.5'.*fraction in \(0, 1\]"),
    Case("generate --temperature -1", "values", (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--temperature", "-1"), 2,
         r"--temperature -1\.0: use a finite value >= 0"),
    Case("generate --temperature nan", "values", (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--temperature", "nan"), 2,
         r"--temperature nan: use a finite value"),
    Case("generate --top-p 0", "values", (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--top-p", "0"), 2,
         r"--top-p 0\.0: use a nucleus mass in \(0, 1\]"),
    Case("generate --top-p 1.5", "values", (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--top-p", "1.5"), 2, r"--top-p 1\.5"),
    Case("generate --max-new-tokens beyond the context", "values",
         (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--max-new-tokens", "100000"), 2,
         r"--max-new-tokens 100000: the model's context is \d+ tokens \(max_position_embeddings\).*use at most \d+"),
    Case("generate --set flex.threshold=abc", "values", (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--set", "flex.threshold=abc"),
         2, r"flex\.threshold='abc': expected a number"),
    Case("generate tokenizer larger than the vocabulary", "values", (G, "--checkpoint", "{case}/small-vocab", "--batch", "{batch}"), 2,
         r"the tokenizer has 484 tokens but the model's vocabulary has 200", setup=_vocab_mismatch),
    # errors that name the culprit
    Case("generate metadata.json not JSON", "culprit", (G, "--checkpoint", "{case}/ckpt", "--batch", "{batch}"), 2,
         r"\S*ckpt/metadata\.json: cannot read converter metadata", setup=lambda w, c: _ckpt_meta(w, c, text="{not json")),
    Case("generate metadata.json a list", "culprit", (G, "--checkpoint", "{case}/ckpt", "--batch", "{batch}"), 2,
         r"\S*ckpt/metadata\.json: expected a JSON object, got list", setup=lambda w, c: _ckpt_meta(w, c, text="[1, 2]")),
    Case("generate metadata.json non-UTF-8", "culprit", (G, "--checkpoint", "{case}/ckpt", "--batch", "{batch}"), 2,
         r"\S*ckpt/metadata\.json: cannot read converter metadata", setup=lambda w, c: _ckpt_bytes(w, c, b"\xff\xfe{\x00")),
    Case("export metadata.json model_config bad field", "culprit", (C, "export", "{case}/ckpt", "{case}/hf"), 2,
         r"\S*ckpt/metadata\.json: model_config: text\.hidden_size='32': must be an integer",
         setup=lambda w, c: _ckpt_meta(w, c, hidden_size="32")),
    Case("generate missing tokenizer", "culprit", (G, "--checkpoint", "{case}/ckpt", "--batch", "{batch}"), 2,
         r"\S*ckpt: no tokenizer files", setup=lambda w, c: _ckpt_copy(w, c, tokenizer=False)),
    Case("generate missing params", "culprit", (G, "--checkpoint", "{case}/ckpt", "--batch", "{batch}"), 2,
         r"\S*ckpt: no params directory", setup=lambda w, c: _ckpt_copy(w, c, params=False), loads=True),
    Case("generate truncated params", "culprit", (G, "--checkpoint", "{case}/ckpt", "--batch", "{batch}"), 2,
         r"\S*ckpt/params: cannot restore the parameters", setup=_truncate_params, loads=True),
    Case("export truncated params", "culprit", (C, "export", "{case}/ckpt", "{case}/hf"), 2,
         r"\S*ckpt/params: cannot restore the parameters", setup=_truncate_params, loads=True),
    Case("generate --mesh banana", "culprit", (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--mesh", "banana"), 2,
         r"--mesh 'banana': mesh spec 'banana' is not axis=size"),
    Case("convert --mesh banana", "culprit", (C, "{src}", "{case}/out", "--mesh", "banana"), 2, r"--mesh banana: mesh spec 'banana'"),
    Case("train --mesh banana", "culprit", ("train", "--init", "random", "--config-json", "{case}/c.json", "--data", "{case}/d.json",
                                            "--mesh", "banana", "--out", "{case}/run"), 2, r"--mesh 'banana': mesh spec 'banana'"),
    Case("generate on an unconverted checkpoint", "culprit", (G, "--checkpoint", "{src}", "--batch", "{batch}"), 2,
         r"\S*src: no metadata\.json \(not a directory written by the converter\)"),
    Case("generate checkpoint missing", "culprit", (G, "--checkpoint", "{case}/nope", "--batch", "{batch}"), 2,
         r"\S*nope: not a directory"),
    Case("bench --report missing", "culprit", ("bench", "--report", "{case}/none.json"), 2, r"--report \S*none\.json: cannot read"),
    Case("bench --report empty", "culprit", ("bench", "--report", "{case}/bench.json"), 2, r"--report \S*bench\.json: the file is empty",
         setup=_report("  \n")),
    Case("bench --report malformed", "culprit", ("bench", "--report", "{case}/bench.json"), 2, r"--report \S*bench\.json: not valid JSON",
         setup=_report("{\"flops_7b\": [")),
    Case("bench --report not a result", "culprit", ("bench", "--report", "{case}/bench.json"), 2,
         r"--report \S*bench\.json: not a bench result \(missing command", setup=_report("{\"x\": 1}")),
    # issue 24: --resume never destroys or mixes; honest exit codes; the last tracebacks
    Case("generate --resume into a user file without a final newline", "destroyed",
         (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--output", "{case}/res_user.json", "--resume", *GEN), 2,
         r"--output \S*res_user\.json was not written by this command .*left as it is",
         setup=lambda w, c: (c / "res_user.json").write_bytes(b'{"keep": true}')),
    Case("generate --resume into another batch's answers", "destroyed",
         (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--output", "{case}/out.jsonl", "--resume", *GEN), 2,
         r"out\.jsonl holds answers of another run; changed: input\.path \(file \S*other\.jsonl\S*, now \S*batch\.jsonl",
         setup=_other_batch),
    Case("generate --resume with another --max-new-tokens", "values",
         (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--output", "{case}/out.jsonl", "--resume", "--max-new-tokens", "3",
          "--batch-size", "4"), 2, r"another run; changed: settings\.max_new_tokens \(file 2, now 3\)",
         setup=lambda w, c: _answers_of(w, c, w.batch, 2, *GEN)),
    Case("generate --resume with another --hr-budget and --dtype", "values",
         (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--output", "{case}/out.jsonl", "--resume", *GEN, "--hr-budget", "0.5",
          "--dtype", "bfloat16"), 2, r"changed: settings\.dtype \(file null, now \"bfloat16\"\); settings\.hr_budget",
         setup=lambda w, c: _answers_of(w, c, w.batch, 2, *GEN)),
    Case("generate --resume with another checkpoint", "values",
         (G, "--checkpoint", "{case}/ckpt", "--batch", "{batch}", "--output", "{case}/out.jsonl", "--resume", *GEN), 2,
         r"another run; changed: checkpoint\.params_digest", setup=_other_params),
    Case("generate --resume: an image replaced at the same path is answered again", "values", _image_replaced, 0, None,
         creates=("{case}/img.png", "{case}/in.jsonl", "{case}/out.jsonl"), loads=True),
    Case("generate attention_impl=cudnn on CPU", "culprit",
         (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--set", "attention_impl=cudnn"), 2,
         r"attention_impl='cudnn' needs a GPU, and the backend here is 'cpu'"),
    Case("generate metadata vocabulary disagrees with the parameters", "culprit",
         (G, "--checkpoint", "{case}/ckpt", "--batch", "{batch}", "--output", "{case}/out.jsonl"), 2,
         r"parameter text/embed/embedding is stored as \[512, 32\] but the model_config in \S*metadata\.json makes it \[1000, 32\]"
         r".*text\.vocab_size=1000 \(the stored array has 512\)", setup=lambda w, c: _ckpt_meta(w, c, vocab_size=1000), loads=True),
    Case("convert safetensors header without data_offsets", "culprit", (C, "{case}/src", "{case}/out"), 2,
         r"model\.safetensors: corrupt safetensors header: tensor '\S+': no 'data_offsets' field", setup=_no_data_offsets, loads=True),
    Case("bench throughput --report missing", "culprit", ("bench", "throughput", "--report", "{case}/nope.json"), 2,
         r"--report \S*nope\.json: cannot read it \(No such file"),
    Case("eval: no item scored exits 1", "lost",
         ("eval", "vqa", "--checkpoint", "{ckpt}", "--data", "{case}/vqa.jsonl", "--images", "{case}/nope", "--out", "{case}/eval",
          "--max-new-tokens", "2", "--no-compile-cache", "--no-progress"), 1, r"no item was scored \(2 of 2 failed", setup=_vqa_data,
         creates=("{case}/eval",), loads=True, check=_eval_nothing_scored),
    Case("eval --out with a predictions file it did not write", "destroyed",
         ("eval", "vqa", "--checkpoint", "{ckpt}", "--data", "{case}/vqa.jsonl", "--images", "{case}/imgs", "--out", "{case}/eval",
          "--no-compile-cache", "--no-progress"), 2, r"--out \S*predictions\.jsonl was not written by this command",
         setup=_foreign_predictions),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile(case: Case, world: World, tmp_path, capsys, monkeypatch):
    run_case(case, world, tmp_path, capsys, monkeypatch)


def run_case(case: Case, world: World, tmp_path: Path, capsys, monkeypatch) -> None:
    """Run one row of a hostile-input table and assert what it must not destroy (see the module docstring)."""
    assert case.kind in KINDS
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    if case.setup is not None:
        case.setup(world, case_dir)
    if not case.loads:  # the check must come before any restoring or reading of weights
        def forbidden(*a, **k):
            raise AssertionError("weights were loaded before the input was checked")

        import convert.importer
        import flexattn_jax.checkpoint

        monkeypatch.setattr(flexattn_jax.checkpoint, "load_converted", forbidden)
        monkeypatch.setattr(convert.importer, "read_checkpoint", forbidden)
    before = {"world": _digest(world.root), "case": _digest(case_dir)}
    capsys.readouterr()
    if callable(case.argv):
        code, out, err = case.argv(world, case_dir)
    else:
        from flexattn_jax.app.cli import main

        code = main([_fill(a, world, case_dir) for a in case.argv])
        out, err = capsys.readouterr()
    assert code == case.exit, (code, out, err)
    assert "Traceback" not in out + err
    if case.msg is not None:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err
        text = err[err.index("error:"):]
        if case.one_line:
            assert text.strip() == errors[0], err
        assert re.search(case.msg, text), (case.msg, err)
    allowed = [Path(_fill(c, world, case_dir)) for c in case.creates]
    after = {"world": _digest(world.root), "case": _digest(case_dir)}
    assert after["world"] == before["world"], "the shared inputs changed"
    for name, digest in before["case"].items():
        assert after["case"].get(name) == digest, f"input {name} changed or vanished"
    new = [case_dir / n for n in set(after["case"]) - set(before["case"])]
    assert all(any(p == a or a in p.parents for a in allowed) for p in new), f"unexpected output: {new}"
    assert not [p for p in world.root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    if case.check is not None:
        case.check(world, case_dir, out, err)


def test_table_covers_each_class():
    counts = {k: sum(c.kind == k for c in CASES) for k in KINDS}
    assert all(counts.values()), counts
    assert len({c.name for c in CASES}) == len(CASES)


# ---- issue 24: signals, in a subprocess whose dispositions the test sets --------------------------

@pytest.mark.parametrize(("sig", "sigint"), [(signal.SIGINT, "default"), (signal.SIGTERM, "default"), (signal.SIGINT, "ignore")],
                         ids=["SIGINT", "SIGTERM", "SIGINT-inherited-ignored"])
def test_signal_stops_generate_waiting_on_its_input(world: World, tmp_path, sig, sigint):
    """Ctrl-C / SIGTERM while the command waits for more input on a pipe whose writer stays open: it exits 130 / 143 at
    once with what is done written (a header and the one item read), no traceback, its inputs unchanged."""
    from tests.signals import open_fifo_for_writing, with_signals

    fifo, out = tmp_path / "in.fifo", tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    before = _digest(world.root)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "XLA_FLAGS": ""}
    cmd = [sys.executable, "-m", "flexattn_jax.app.cli", "generate", "--checkpoint", str(world.ckpt), "--batch", str(fifo),
           "--output", str(out), *GEN]
    proc = subprocess.Popen(with_signals(cmd, sigint), env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # for opening the FIFO and for the first answer
        fd = open_fifo_for_writing(fifo, proc, timeout=120)
        os.write(fd, b"not json\n")  # one item (answered with its error: no compile), then the pipe stays open
        while not (out.exists() and len(out.read_text().splitlines()) == 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        os.close(fd)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert f"interrupted: 1 items written to {out}; run again with --resume to finish" in err, err
    header, record = (json.loads(x) for x in out.read_text().splitlines())
    assert header["flexattn_jax"] == "generate answers" and record["index"] == 0 and "not JSON" in record["error"]
    assert _digest(world.root) == before
