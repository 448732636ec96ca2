"""`flexattn-jax generate` on a tiny converted checkpoint: bad input, --save-attention, --mesh; the overlays.

(Streaming, --resume, Ctrl-C and the compile cache: tests/test_streaming_inference.py.)"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from PIL import Image

from flexattn_jax.app.cli import main
from flexattn_jax.app.inference import Answer
from flexattn_jax.app.visualize import answer_maps, mask_layer, outline_segments, save_grid, save_overlay, share_of_attention
from flexattn_jax.config import ModelConfig

from .checkpoints import write_tiny_checkpoint

GEN = ["--max-new-tokens", "2", "--batch-size", "8", "--no-compile-cache"]  # the same static shapes in every call: one compile


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
    """A converted-format directory (orbax params + metadata.json + tokenizer) of tests.fixtures' tiny FlexAttention model."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("generate-cli") / "ckpt")


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


def test_decoder_reason_holds_under_reader_threads(files):
    """The plugin's own reason comes back from many reader threads at once, while others juggle warnings.

    (The reason once came from PIL's warnings: another thread's ``catch_warnings`` could swallow it.)"""
    import threading
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from flexattn_jax.preprocess import PreprocessError, load_image

    stop = threading.Event()

    def juggle():
        while not stop.is_set():
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                warnings.warn("noise", stacklevel=1)

    def read(_):
        try:
            load_image(files / "two_channel.tif")
        except PreprocessError as e:
            return str(e)
        return "opened"

    jugglers = [threading.Thread(target=juggle) for _ in range(4)]
    for t in jugglers:
        t.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            messages = list(pool.map(read, range(64)))
    finally:
        stop.set()
        for t in jugglers:
            t.join()
    assert all("unsupported TIFF image (unknown pixel mode)" in m for m in messages), set(messages)


def test_batch_reports_bad_items_and_answers_the_rest(ckpt, files, tmp_path, capsys):
    cases = _cases(files)
    batch = tmp_path / "in.jsonl"
    batch.write_text("\n".join(json.dumps({"image": str(i), "prompt": p}) for i, p, _ in cases) + "\n\n")
    out, pngs = tmp_path / "out.jsonl", tmp_path / "png"
    assert main(["generate", "--checkpoint", str(ckpt), "--batch", str(batch), "--output", str(out),
                 "--save-attention", str(pngs), *GEN]) == 0
    assert "6 of 8 items failed" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()[1:]]  # after the header record
    assert [r["image"] for r in rows] == [str(i) for i, _, _ in cases]
    assert [(r["index"], r["line"]) for r in rows] == [(i, i + 1) for i in range(len(cases))]
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


def test_bad_jsonl_lines_get_an_error_in_place_and_the_rest_is_answered(ckpt, files, tmp_path, capsys):
    good = json.dumps({"image": str(files / "wide.png"), "prompt": "what?"}).encode()
    lines = [
        (good, None),
        (b'{"image": "a.png", "prompt": "x"', "line 2: not JSON"),
        (b'["a.png", "x"]', "line 3: expected an object"),
        (b"", None),  # blank: skipped, still counted as a line
        (b'{"image": "a.png"}', "line 5: missing field 'prompt'"),
        (b'{"image": 3, "prompt": "x"}', "line 6: field 'image' must be a string, got int"),
        (b'{"image": "caf\xe9.png", "prompt": "x"}', "line 7: not UTF-8 text (invalid continuation byte at byte 14)"),
        (b"\xef\xbb\xbf" + good, "line 8: starts with a UTF-8 byte-order mark (BOM)"),
        (good, None),
    ]
    batch, out = tmp_path / "bad.jsonl", tmp_path / "out.jsonl"
    batch.write_bytes(b"\n".join(raw for raw, _ in lines) + b"\n")
    assert main(["generate", "--checkpoint", str(ckpt), "--batch", str(batch), "--output", str(out), *GEN]) == 0
    assert "6 of 8 items failed" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()[1:]]  # after the header record
    expected = [(n, why) for n, (raw, why) in enumerate(lines, 1) if raw]
    assert [(r["index"], r["line"]) for r in rows] == [(i, n) for i, (n, _) in enumerate(expected)]
    for r, (_, why) in zip(rows, expected, strict=True):
        if why is None:
            assert r["error"] is None and isinstance(r["answer"], str), r
        else:
            assert r["error"].startswith(f"{batch} {why}") and r["answer"] is None, r
    # every item failed: nothing answered, exit status 1 (the finished file is replaced only with --overwrite)
    batch.write_bytes(b"\n".join(raw for raw, why in lines if why) + b"\n")
    assert main(["generate", "--checkpoint", str(ckpt), "--batch", str(batch), "--output", str(out), *GEN, "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "6 of 6 items failed" in err and "no item was answered" in err
    assert len(out.read_text().splitlines()) == 1 + 6


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


def test_outlines_trace_the_selected_region_once():
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True  # a 2 x 2 block: 8 unit edges on its border, none inside
    mask[3, 0] = True  # a lone cell on the border: 4 edges
    segs = outline_segments(mask, side=40.0)
    assert segs.shape == (12, 2, 2)
    lengths = np.linalg.norm(segs[:, 1] - segs[:, 0], axis=-1)
    np.testing.assert_allclose(lengths, 10.0)
    mids = {tuple(m) for m in ((segs[:, 0] + segs[:, 1]) / 2).tolist()}
    assert (20.0, 15.0) not in mids and (15.0, 20.0) not in mids  # no edge between two selected cells
    assert {(5.0, 30.0), (0.0, 35.0), (5.0, 40.0), (10.0, 35.0)} <= mids  # the lone cell's four sides
    assert outline_segments(np.zeros((3, 3), bool), 9.0).shape == (0, 2, 2)
    share = share_of_attention(np.array([1.0, 3.0, 0.0, 4.0]))
    np.testing.assert_allclose(share, [[12.5, 37.5], [0.0, 50.0]])


def test_overlay_follows_the_mask_and_the_grid_draws_every_item(tmp_path):
    from tests.fixtures import tiny_config

    cfg: ModelConfig = tiny_config()  # 3 text layers, selection at layer 1: layer 1's mask feeds layer 2
    assert mask_layer(cfg) == 1
    g, hr = cfg.lr_grid, cfg.hr_grid
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 60, 3), dtype=np.uint8))
    att = np.linspace(0, 1, g * g, dtype=np.float32)
    mask_a = np.zeros((hr, hr), bool)
    mask_a[:2, :2] = mask_a[-2:, :2] = True  # the top-left and bottom-left corners
    mask_b = mask_a.copy()
    mask_b[-2:, :2], mask_b[-2:, -2:] = False, True  # the top-left and bottom-right corners: as many tokens
    kw = dict(question="<image>\nwhat is in the corner?", answer="a square", layer=1)
    a = _pixels(save_overlay(tmp_path / "a.png", img, att, mask_a.ravel(), **kw))
    b = _pixels(save_overlay(tmp_path / "b.png", img, att, mask_b.ravel(), **kw))
    a2 = _pixels(save_overlay(tmp_path / "a2.png", img, att, mask_a.ravel(), **kw))
    c = _pixels(save_overlay(tmp_path / "c.png", img, att[::-1].copy(), mask_a.ravel(), **kw))
    assert a.shape == b.shape and np.array_equal(a, a2)  # deterministic
    diff = np.abs(a - b).sum(-1) > 0
    ys, xs = np.nonzero(diff)
    assert diff.any() and ys.min() > a.shape[0] // 2  # the new outline: only in the lower part of the image
    heat = np.abs(a - c).sum(-1) > 0
    assert heat.sum() > 20 * diff.sum()  # the heat map covers the whole image
    ans = Answer("a", [1], None, np.stack([mask_a.ravel()] * 3), np.stack([att] * 3))
    got_att, got_mask = answer_maps(ans, cfg)
    np.testing.assert_array_equal(got_mask, mask_a.ravel())
    assert answer_maps(Answer(None, error="x"), cfg) == (None, None)
    grid = save_grid(tmp_path / "grid.png", [img, img.rotate(90, expand=True), img], [att, att, None],
                     [mask_a.ravel(), mask_b.ravel(), None], map_titles=["1", "2", "3"], selection_titles=["a", "b", "c"])
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.size == (3 * 3 * 90, 6 * 90)  # 3 columns, 2 rows at 90 dpi
    with pytest.raises(ValueError, match="as many maps"):
        save_grid(tmp_path / "bad.png", [img], [att, att], [mask_a])
