"""Tiny evaluation sets laid out exactly like the real ones (V* Bench, MagnifierBench, TextVQA, LLaVA's files, POPE-style JSONL).

Each writer puts a few good samples and named bad ones (malformed JSON, a missing image, a missing
field) and returns the path ``flexattn-jax eval --data`` takes.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

ANSWERS_10 = ["dakota", "dakota", "dakota digital", "dakota", "kodak", "dakota", "dakota", "dakota", "Dakota", "dakota"]


def _image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_vstar(root: Path) -> Path:
    """``direct_attributes/`` (3 good, 1 malformed JSON) and ``relative_position/`` (2 good, 1 without image)."""
    for category, n, options in (("direct_attributes", 3, ["red", "blue", "green", "yellow"]),
                                 ("relative_position", 2, ["left", "right"])):
        d = root / category
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            sid = f"sa_{1000 + i}"
            opts = options[i % len(options):] + options[: i % len(options)]
            (d / f"{sid}.json").write_text(json.dumps({"target_object": ["cup"], "bbox": [[1, 2, 3, 4]],
                                                      "question": f"What is the colour of the cup {i}?", "options": opts}))
            _image(i + (10 if category == "relative_position" else 0)).save(d / f"{sid}.{'jpg' if i % 2 == 0 else 'png'}")
    (root / "direct_attributes" / "sa_broken.json").write_text('{"question": "What is it?", "options": ["a", ')
    (root / "relative_position" / "sa_noimage.json").write_text(json.dumps({"question": "Is it left?", "options": ["left", "right"]}))
    return root


def write_magnifier(root: Path) -> Path:
    """Otter's ``data_instructions.json`` (3 good, 1 whose image id is not in ``images.json``) and ``images.json``."""
    root.mkdir(parents=True, exist_ok=True)
    images, data = {}, {}
    for i in range(3):
        buf = io.BytesIO()
        _image(20 + i, (36, 48)).save(buf, format="PNG")
        images[f"img_{i}"] = base64.b64encode(buf.getvalue()).decode()
        data[f"MagnifierBench_{i}"] = {
            "instruction": f"What is on the small square {i}? A. a cup, B. a pen, C. a key, D. nothing",
            "answer": "ABCD"[i], "image_ids": [f"img_{i}"], "rel_ins_ids": [],
        }
    data["MagnifierBench_lost"] = {"instruction": "What is it? A. x, B. y, C. z, D. w", "answer": "A",
                                   "image_ids": ["img_missing"], "rel_ins_ids": []}
    (root / "data_instructions.json").write_text(json.dumps({"meta": {"version": "0.0.1", "time": "2023-10-31",
                                                                      "author": "ntu"}, "data": data}))
    (root / "images.json").write_text(json.dumps(images))
    return root


def write_textvqa(root: Path) -> tuple[Path, Path]:
    """``TextVQA_0.5.1_val.json`` (3 questions on 2 images + 1 whose image is missing), ``train_images/``,
    and LLaVA's ``llava_textvqa_val_v051_ocr.jsonl`` for the same questions. Returns (official JSON, LLaVA JSONL)."""
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    rows = [("003a8ae2ef43b901", "what is the brand of this camera?", ANSWERS_10, 34602),
            ("003a8ae2ef43b901", "what does the small white text spell?", ["copenhagen"] * 7 + ["thursday"] * 3, 34603),
            ("00685bc495504d61", "what number is on the player's jersey?", ["22"] * 9 + ["twenty two"], 34604),
            ("0000missing00000", "what is written here?", ["stop"] * 10, 34605)]
    for k, image_id in enumerate(("003a8ae2ef43b901", "00685bc495504d61")):
        _image(30 + k, (50, 32)).save(root / "train_images" / f"{image_id}.jpg")
    data = [{"question": q, "image_id": img, "image_classes": ["Camera"], "flickr_original_url": "", "flickr_300k_url": "",
             "image_width": 50, "image_height": 32, "answers": ans, "question_tokens": q.split(), "question_id": qid,
             "set_name": "val"} for img, q, ans, qid in rows]
    official = root / "TextVQA_0.5.1_val.json"
    official.write_text(json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}))
    llava = root / "llava_textvqa_val_v051_ocr.jsonl"
    with open(llava, "w") as f:
        for img, q, _, qid in rows:
            text = f"{q}\nReference OCR token: dakota, digital, single-use\nAnswer the question using a single word or phrase."
            f.write(json.dumps({"question_id": qid, "image": f"{img}.jpg", "text": text, "category": "default"}) + "\n")
    return official, llava


def write_pope(root: Path) -> Path:
    """A POPE-style JSONL (yes/no answers, categories), with one malformed line and one line missing 'answers'."""
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(4):
        name = f"COCO_val2014_{i:012d}.jpg"
        _image(40 + i).save(root / "val2014" / name)
        lines.append(json.dumps({"question_id": i, "image": name, "question": f"Is there a square {i} in the image?",
                                 "answers": ["yes" if i % 2 == 0 else "no"], "category": ["adversarial", "random"][i // 2]}))
    lines.insert(2, '{"question_id": 9, "image": "x.jpg", "question": "Is there')
    lines.append(json.dumps({"question_id": 10, "image": "x.jpg", "question": "Is there a cat?"}))
    path = root / "pope.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
