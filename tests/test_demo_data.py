"""The synthetic HR VQA task: determinism, format, and 'separable at HR, not after a 3x down-sampling'."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from flexattn_jax.app import demo_data as dd
from flexattn_jax.preprocess import format_conversation, load_image, preprocess_image
from tests.fixtures import write_llava_dataset


def test_write_llava_dataset_is_deterministic(tmp_path):
    a = write_llava_dataset(tmp_path / "a", seed=7, n=6)
    b = write_llava_dataset(tmp_path / "b", seed=7, n=6)
    c = write_llava_dataset(tmp_path / "c", seed=8, n=6)
    assert a.read_bytes() == b.read_bytes()
    records = json.loads(a.read_text())
    assert len(records) == 6
    for rec in records:
        assert (tmp_path / "a" / rec["image"]).read_bytes() == (tmp_path / "b" / rec["image"]).read_bytes()
    rec_c = json.loads(c.read_text())
    assert (tmp_path / "a" / records[0]["image"]).read_bytes() != (tmp_path / "c" / rec_c[0]["image"]).read_bytes()


def test_llava_format(tmp_path):
    path = write_llava_dataset(tmp_path, seed=1, n=8, hr_size=168)
    records = json.loads(path.read_text())
    assert [r["meta"]["class"] for r in records] == list(dd.CLASSES) * 2  # balanced
    for rec in records:
        assert set(rec) >= {"id", "image", "conversations"}
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") and human["value"][len("<image>\n") :] in dd.QUESTIONS
        assert gpt["value"] in dd.CLASSES and gpt["value"] == rec["meta"]["class"]
        img = load_image(tmp_path / rec["image"])
        assert img.size == (168, 168)
        text, spans = format_conversation(rec["conversations"])
        assert [text[s:e] for s, e in spans] == [gpt["value"] + "</s>"]


def test_split_is_prefix_stable_and_seeded():
    s4, s2 = dd.make_split(3, 4), dd.make_split(3, 2)
    for (i1, q1, a1, m1), (i2, q2, a2, m2) in zip(s2, s4[:2], strict=True):
        assert np.array_equal(np.asarray(i1), np.asarray(i2)) and (q1, a1, m1) == (q2, a2, m2)
    assert {m["obj_px"] for *_, m in dd.make_split(0, 16)} <= {6, 9}


def test_object_geometry():
    for seed in range(8):
        img, question, answer, meta = dd.make_sample(np.random.default_rng(seed))
        arr = np.asarray(img)
        x0, y0, x1, y1 = meta["frame_bbox"]
        px0, py0, px1, py1 = meta["bbox"]
        assert 0 <= x0 < px0 < px1 < x1 <= 168 and px1 - px0 == meta["obj_px"] == py1 - py0
        assert tuple(arr[y0, x0]) == tuple(meta["frame_color"])
        patch = arr[py0:py1, px0:px1].astype(float)
        assert (patch[..., 0] == patch[..., 1]).all() and (patch[..., 0] == patch[..., 2]).all()  # grey pattern
        assert abs(patch.mean() / 255 - 0.5) < 0.01  # every class has the same mean
        assert question in dd.QUESTIONS and answer == meta["class"]


def _class_stack(seed: int, hr_size: int = 168) -> tuple[list[np.ndarray], dict]:
    """The same image (background, placement, phase, frame) with each of the four patterns."""
    out = []
    for name in dd.CLASSES:
        img, _, _, meta = dd.make_sample(np.random.default_rng(seed), hr_size, cls=name)
        out.append(np.asarray(img, np.float64) / 255.0)
    return out, meta


def test_separable_at_hr_not_after_3x_downsampling():
    for seed in range(12):
        hr, meta = _class_stack(seed)
        px0, py0, px1, py1 = meta["bbox"]
        x0, y0, x1, y1 = meta["frame_bbox"]
        # full resolution: the pattern pixels differ by most of the pattern's contrast
        assert class_separation([h[py0:py1, px0:px1] for h in hr]) > 0.6
        lr_views = {
            "antialiased bilinear": [downsample(h, 3) for h in hr],
            "box": [h.reshape(56, 3, 56, 3, 3).mean((1, 3)) for h in hr],
            "PIL bicubic": [np.asarray(Image.fromarray(np.rint(h * 255).astype(np.uint8)).resize((56, 56), Image.BICUBIC)) / 255.0
                            for h in hr],
        }
        box = (slice(y0 // 3 - 2, (y1 + 2) // 3 + 2), slice(x0 // 3 - 2, (x1 + 2) // 3 + 2))
        for kind, lr in lr_views.items():
            means = [float(v[box].mean()) for v in lr]
            assert max(means) - min(means) < 0.005, (kind, seed, means)  # the same grey on average
            # per pixel only a thin rim leaks (partial periods at the frame): far below the HR difference
            assert class_separation(lr) < {"antialiased bilinear": 0.08, "box": 0.005, "PIL bicubic": 0.11}[kind], (kind, seed)
            outside = np.ones(lr[0].shape[:2], bool)
            outside[box] = False
            assert class_separation([v[outside] for v in lr]) < 0.01  # nothing away from the object


def test_pattern_interior_is_exactly_flat_after_antialiased_downsampling():
    for name in dd.CLASSES:
        for phase in [(0, 0), (1, 2), (2, 1)]:
            big = dd.pattern_patch(name, 30, phase)
            lr = downsample(big, 3)[2:-2, 2:-2]  # away from the patch edge
            np.testing.assert_allclose(lr, 0.5, atol=1e-12)
            assert big.max() - big.min() == pytest.approx(0.7)


def test_object_visible_at_low_resolution():
    for seed in range(8):
        img, _, _, meta = dd.make_sample(np.random.default_rng(seed))
        lr = downsample(np.asarray(img, np.float64) / 255.0, 3)
        x0, y0, x1, y1 = meta["frame_bbox"]
        cy, cx = (y0 + y1) // 6, (x0 + x1) // 6
        ring = np.concatenate([lr[max(cy - 5, 0) : cy + 6, c] for c in (max(cx - 5, 0), min(cx + 5, 55))])
        obj = lr[y0 // 3 : (y1 + 2) // 3, x0 // 3 : (x1 + 2) // 3]
        background = np.median(ring, axis=0)
        assert np.abs(obj - background).sum(-1).max() > 0.3  # a clearly different colour where the object is


def test_downsample_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((168, 168, 3))
    ref = torch.nn.functional.interpolate(
        torch.tensor(x).permute(2, 0, 1)[None], size=(56, 56), mode="bilinear", antialias=True, align_corners=False
    )[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(downsample(x, 3), ref, atol=1e-12)


def test_aspect_jitter_pads_to_square():
    sizes = set()
    for seed in range(6):
        img, _, _, meta = dd.make_sample(np.random.default_rng(seed), 168, aspect_jitter=0.3)
        w, h = img.size
        sizes.add((w, h))
        assert max(w, h) == 168 and min(w, h) >= 117 and meta["size"] == [w, h]
        x0, y0, x1, y1 = meta["frame_bbox"]
        assert x1 <= w and y1 <= h
        px0, py0 = meta["bbox"][:2]
        assert (px0 + (168 - w) // 2) % 3 == 0 and (py0 + (168 - h) // 2) % 3 == 0  # on the LR grid once padded
        pixels, ori = preprocess_image(img, 168)
        assert pixels.shape == (168, 168, 3) and ori == (w, h)
    assert any(w != h for w, h in sizes)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown class"):
        dd.make_sample(np.random.default_rng(0), cls="spotted")
    with pytest.raises(ValueError, match="multiple of 3"):
        dd.make_sample(np.random.default_rng(0), obj_px=(7, 8))
    img, *_ , meta = dd.make_sample(np.random.default_rng(0), obj_px=7, whole_periods=False)
    assert meta["obj_px"] == 7
    with pytest.raises(ValueError, match="does not fit"):
        dd.make_sample(np.random.default_rng(0), hr_size=10)


# ---- analysis helpers (test-only) ----------------------------------------------------------------

def downsample(arr: np.ndarray, factor: int) -> np.ndarray:
    """Antialiased bilinear down-sampling by an integer factor, as PyTorch's
    ``interpolate(mode='bilinear', antialias=True, align_corners=False)`` (HW or HWC, float64 out)."""
    arr = np.asarray(arr, np.float64)
    h, w = arr.shape[:2]
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"image {h}x{w} is not divisible by factor {factor}")
    wy, wx = _aa_weights(h, h // factor), _aa_weights(w, w // factor)
    return np.einsum("oh,hw...->ow...", wy, np.einsum("pw,hw...->hp...", wx, arr))


def _aa_weights(n_in: int, n_out: int) -> np.ndarray:
    scale = n_in / n_out
    support = scale  # the triangle filter's support (1) times the scale
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        wts = np.maximum(0.0, 1.0 - np.abs((j + 0.5 - center) / scale))
        weights[i, lo:hi] = wts / wts.sum()
    return weights


def class_separation(samples: Sequence[np.ndarray]) -> float:
    """Largest per-pixel spread (max - min) across a stack of same-shaped images."""
    stack = np.stack([np.asarray(s, np.float64) for s in samples])
    return float((stack.max(0) - stack.min(0)).max())
