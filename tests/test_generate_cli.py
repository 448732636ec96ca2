"""`flexattn-jax generate` on a tiny converted checkpoint: bad input, --save-attention, --mesh; the overlays."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from PIL import Image

from flexattn_jax.cli import main
from flexattn_jax.config import ModelConfig
from flexattn_jax.inference import Answer
from flexattn_jax.visualize import answer_maps, mask_layer, save_grid, save_overlay

GEN = ["--max-new-tokens", "2", "--batch-size", "8"]  # the same static shapes in every call: one compile


def _two_channel_16bit_tiff(w: int = 4, h: int = 4) -> bytes:
    """A valid little-endian TIFF of 2 samples x 16 bits per pixel: a pixel layout PIL has no mode for."""
    data_off, data = 8 + 2 + 11 * 12 + 4, bytes(w * h * 4)
    short = lambda tag, v: struct.pack("<HHIHH", tag, 3, 1, v, 0)  # noqa: E731
    entries = [
        short(256, w), short(257, h), struct.pack("<HHIHH", 258, 3, 2, 16, 16), short(259, 1), short(262, 1),
        struct.pack("<HHII", 273, 4, 1, data_off), short(277, 2), short(278, h), struct.pack("<HHII", 279, 4, 1, len(data)),
        short(284, 1), short(338, 0),
    ]
    return b"II" + struct.pack("<HI", 42, 8) + struct.pack("<H", len(entries)) + b"".join(entries) + b"\0\0\0\0" + data


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A converted-format directory (orbax params + metadata.json + tokenizer) of train.testing's tiny FlexAttention model."""
    from convert.io import CONVERTER_VERSION, FORMAT, save_params
    from flexattn_jax.tokenizer import build_tokenizer
    from train.testing import random_params, tiny_config

    cfg = tiny_config()
    d = tmp_path_factory.mktemp("generate-cli") / "ckpt"
    d.mkdir()
    save_params(random_params(cfg, seed=2, std=0.3), d / "params")
    (d / "metadata.json").write_text(json.dumps({"format": FORMAT, "converter_version": CONVERTER_VERSION,
                                                 "model_config": cfg.to_dict()}))
    build_tokenizer().save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(d / "wide.png")
    Image.fromarray(rng.integers(0, 256, (50, 20), dtype=np.uint8)).save(d / "tall grey.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (d / "two_channel.tif").write_bytes(_two_channel_16bit_tiff())
    return d


def _cases(files):
    """(image, prompt, expected error fragment or None) for every kind of item."""
    return [
        (files / "wide.png", "what is the small square?", None),
        (files / "missing.png", "what is it?", "image file not found: " + str(files / "missing.png")),
        (files / "corrupt.png", "what is it?", "cannot read image file " + str(files / "corrupt.png")),
        (files / "two_channel.tif", "what is it?", "two_channel.tif: unsupported TIFF image (unknown pixel mode)"),
        (files / "wide.png", "   ", "empty prompt"),
        (files / "wide.png", "square " * 600, "the context allows"),
        (files / "wide.png", "<image> compare with <image>", "2 <image> tags"),
        (files / "tall grey.png", "<image>\nwhich pattern?", None),
    ]


def test_batch_reports_bad_items_and_answers_the_rest(ckpt, files, tmp_path, capsys):
    cases = _cases(files)
    batch = tmp_path / "in.jsonl"
    batch.write_text("\n".join(json.dumps({"image": str(i), "prompt": p}) for i, p, _ in cases) + "\n\n")
    out, pngs = tmp_path / "out.jsonl", tmp_path / "png"
    assert main(["generate", "--checkpoint", str(ckpt), "--batch", str(batch), "--output", str(out),
                 "--save-attention", str(pngs), *GEN]) == 0
    assert "6 of 8 items failed" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(i) for i, _, _ in cases]
    for r, (_, _, err) in zip(rows, cases, strict=True):
        if err is None:
            assert r["error"] is None and isinstance(r["answer"], str), r
            with Image.open(r["attention"]) as im:  # the overlay PNG of this item
                assert im.format == "PNG" and im.size[0] > 100
        else:
            assert err in r["error"] and r["answer"] is None and r["attention"] is None, r
    assert sorted(p.name for p in pngs.iterdir()) == ["0000_wide.png", "0007_tall_grey.png"]


def test_single_mode_fails_with_a_message(ckpt, files, tmp_path, capsys):
    for image, prompt, err in _cases(files):
        rc = main(["generate", "--checkpoint", str(ckpt), "--image", str(image), "--prompt", prompt, *GEN])
        captured = capsys.readouterr()
        if err is None:
            assert rc == 0 and captured.out.endswith("\n") and "tokens/s" in captured.err, captured
        else:
            assert rc == 1 and err in captured.err and captured.out == "", (image, prompt, captured)
    png = tmp_path / "single"
    assert main(["generate", "--checkpoint", str(ckpt), "--image", str(files / "wide.png"), "--prompt", "which?",
                 "--save-attention", str(png), *GEN]) == 0
    assert [p.name for p in png.iterdir()] == ["0000_wide.png"]


@pytest.mark.parametrize("line,why", [
    ('{"image": "a.png", "prompt": "x"', "line 2: not JSON"),
    ('["a.png", "x"]', "line 2: expected an object"),
    ('{"image": "a.png"}', "line 2: missing field 'prompt'"),
    ('{"image": 3, "prompt": "x"}', "line 2: field 'image' must be a string, got int"),
])
def test_bad_jsonl_line_names_file_and_line(ckpt, tmp_path, capsys, line, why):
    batch = tmp_path / "bad.jsonl"
    batch.write_text('{"image": "a.png", "prompt": "x"}\n' + line + "\n")
    assert main(["generate", "--checkpoint", str(ckpt), "--batch", str(batch)]) == 2
    assert f"{batch} {why}" in capsys.readouterr().err


def test_bad_arguments_are_refused_before_loading(ckpt, tmp_path, capsys):
    argv = ["generate", "--checkpoint", str(ckpt), "--image", "x.png", "--prompt", "q"]
    assert main([*argv, "--mesh", "data=8", "--batch-size", "6"]) == 2
    assert "batch_size=6 is not a multiple of the mesh's data axis (8)" in capsys.readouterr().err
    assert main([*argv, "--mesh", "data=3"]) == 2
    assert "--mesh 'data=3': mesh {'data': 3" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(ckpt), "--batch", str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot read --batch file " + str(tmp_path / "nope.jsonl") in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path), *argv[3:]]) == 2
    assert "no metadata.json" in capsys.readouterr().err


def test_mesh_output_equals_single_device(ckpt, files, tmp_path):
    batch = tmp_path / "in.jsonl"
    batch.write_text("\n".join(json.dumps({"image": str(files / n), "prompt": f"what {w}?"})
                               for n, w in [("wide.png", "square"), ("tall grey.png", "is it"), ("missing.png", "x")]))
    outs = []
    for extra in ([], ["--mesh", "data=8"]):
        out = tmp_path / f"out{len(extra)}.jsonl"
        assert main(["generate", "--checkpoint", str(ckpt), "--batch", str(batch), "--output", str(out), *GEN, *extra]) == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1]


# ---- the overlays ---------------------------------------------------------------------------------

def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.int16)


def test_overlay_follows_the_mask_and_the_grid_draws_every_item(tmp_path):
    from train.testing import tiny_config

    cfg: ModelConfig = tiny_config()  # 3 text layers, selection at layer 1: layer 1's mask feeds layer 2
    assert mask_layer(cfg) == 1
    g, hr = cfg.lr_grid, cfg.hr_grid
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 60, 3), dtype=np.uint8))
    att = np.linspace(0, 1, g * g, dtype=np.float32)
    mask_a = np.zeros(hr * hr, bool)
    mask_a[:5] = True
    mask_b = mask_a.copy()
    mask_b[-7:] = True
    a = _pixels(save_overlay(tmp_path / "a.png", img, att, mask_a, title="q -> a", layer=1))
    b = _pixels(save_overlay(tmp_path / "b.png", img, att, mask_b, title="q -> a", layer=1))
    a2 = _pixels(save_overlay(tmp_path / "a2.png", img, att, mask_a, title="q -> a", layer=1))
    assert a.shape == b.shape and np.array_equal(a, a2)  # deterministic
    diff = np.abs(a - b).sum(-1) > 0
    assert diff.any()
    cols = np.nonzero(diff.any(0))[0]
    assert cols.min() > a.shape[1] // 2  # only the selection panel (right half) changes
    ans = Answer("a", [1], None, np.stack([mask_a] * 3), np.stack([att] * 3))
    got_att, got_mask = answer_maps(ans, cfg)
    np.testing.assert_array_equal(got_mask, mask_a)
    assert answer_maps(Answer(None, error="x"), cfg) == (None, None)
    grid = save_grid(tmp_path / "grid.png", [img, img.rotate(90, expand=True), img], [att, att, None], [mask_a, mask_b, None],
                     map_titles=["1", "2", "3"], selection_titles=["a", "b", "c"])
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.size == (3 * 3 * 90, 6 * 90)  # 3 columns, 2 rows at 90 dpi
    with pytest.raises(ValueError, match="as many maps"):
        save_grid(tmp_path / "bad.png", [img], [att, att], [mask_a])
