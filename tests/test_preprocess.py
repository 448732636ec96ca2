"""Host-side preprocessing: image loading, LLaVA 'pad' + CLIP parity, the v1 template, tokens, labels, batches."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from flexattn_jax.app.demo_data import build_demo_tokenizer
from flexattn_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX_ORIGINAL
from flexattn_jax.model import positions_from_mask
from flexattn_jax.preprocess import (
    BUCKETS,
    CLIP_MEAN_RGB,
    SYSTEM_PROMPT,
    PreprocessError,
    bucket_length,
    expand_to_square,
    format_conversation,
    format_prompt,
    load_image,
    pad_batch,
    preprocess_image,
    tokenize_conversation,
    tokenize_with_image,
)
from flexattn_jax.tokenizer import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, UNK_ID, load_tokenizer


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_demo_tokenizer()


# ---- images ------------------------------------------------------------------------------------

def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F", "RGB"])
def test_load_image_modes(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(np.full((5, 7), 65535, np.uint16))
        img.putpixel((0, 0), 32896)
    elif mode == "I":
        img = Image.fromarray(np.full((5, 7), 40000, np.int32))
    elif mode == "F":
        img = Image.fromarray(np.full((5, 7), 0.5, np.float32))
    else:
        img = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).convert(mode)
    ext = {"CMYK": "jpg", "I;16": "png", "I": "tif", "F": "tif"}.get(mode, "png")
    out = load_image(_save(img, tmp_path / f"x.{ext}"))
    assert out.mode == "RGB" and out.size == (7, 5)
    arr = np.asarray(out)
    if mode == "I;16":
        assert tuple(arr[0, 1]) == (255, 255, 255) and tuple(arr[0, 0]) == (128, 128, 128)  # scaled, not clipped
    if mode == "I":
        assert tuple(arr[0, 0]) == (156, 156, 156)
    if mode == "F":
        assert tuple(arr[0, 0]) == (128, 128, 128)


def test_alpha_drop_and_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent
    path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")
    assert tuple(np.asarray(load_image(path))[0, 0]) == (200, 0, 0)  # LLaVA: convert('RGB') drops alpha
    assert tuple(np.asarray(load_image(path, alpha="white"))[0, 0]) == (255, 255, 255)
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.info["transparency"] = 1
    path = _save(p, tmp_path / "p.png", transparency=1)
    assert tuple(np.asarray(load_image(path))[0, 0]) == (10, 20, 30)
    assert tuple(np.asarray(load_image(path, alpha="white"))[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_exif_orientation(tmp_path, ext):
    arr = np.zeros((2, 4, 3), np.uint8)
    arr[:, :2] = (255, 0, 0)  # left half red (as stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = _save(Image.fromarray(arr), tmp_path / f"e.{ext}", exif=exif, **({"quality": 100} if ext == "jpg" else {}))
    out = np.asarray(load_image(path)).astype(int)
    assert out.shape == (4, 2, 3)
    assert out[0, 0, 0] > 200 and out[0, 0, 1] < 60  # the stored left half is now on top
    assert out[-1, 0, 0] < 60


def test_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(PreprocessError, match="nope.png"):
        load_image(missing)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(PreprocessError, match="corrupt.png"):
        load_image(corrupt)
    good = _save(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), tmp_path / "g.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(PreprocessError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(PreprocessError, match=str(tmp_path.name)):
        load_image(tmp_path)


def _llava_expand2square(pil_img, background_color):  # verbatim from llava/mm_utils.py
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


@pytest.mark.parametrize("size", [(7, 4), (4, 7), (6, 6), (9, 2)])
def test_expand_to_square_matches_llava(size):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = np.asarray(expand_to_square(img))
    ref = np.asarray(_llava_expand2square(img, CLIP_MEAN_RGB))
    np.testing.assert_array_equal(ours, ref)
    assert CLIP_MEAN_RGB == (122, 116, 104)
    if size[0] > size[1]:
        assert tuple(ours[0, 0]) == CLIP_MEAN_RGB


def _clip_processor(size: int):
    try:  # the PIL backend is what CLIPImageProcessor resolves to without torchvision
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as cls
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@pytest.mark.parametrize("src,size", [(97, 56), (56, 56), (40, 336), (500, 336)])
def test_clip_processor_parity(src, size):
    img = Image.fromarray(np.random.default_rng(src).integers(0, 256, (src, src, 3), dtype=np.uint8))
    ref = _clip_processor(size)(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours, ori = preprocess_image(img, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32 and ori == (src, src)
    assert np.abs(ours - ref).max() < 1e-5


def test_preprocess_pads_nonsquare():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8))  # 50 wide, 30 high
    ref = _clip_processor(56)(_llava_expand2square(img, CLIP_MEAN_RGB), return_tensors="np")["pixel_values"][0]
    out = [preprocess_image(im, 56) for im in (img, img.transpose(Image.Transpose.TRANSPOSE))]
    pixels, ori = np.stack([p for p, _ in out]), np.asarray([s for _, s in out], np.int32)
    assert pixels.shape == (2, 56, 56, 3) and ori.tolist() == [[50, 30], [30, 50]]
    assert np.abs(pixels[0] - ref.transpose(1, 2, 0)).max() < 1e-5


# ---- template ------------------------------------------------------------------------------------

def test_format_prompt():
    assert format_prompt("What pattern is the small square?") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nWhat pattern is the small square? ASSISTANT:"
    )
    assert format_prompt("Hi <image>", has_image=True).endswith("USER: <image>\nHi ASSISTANT:")
    assert format_prompt("Hi", has_image=False) == SYSTEM_PROMPT + " USER: Hi ASSISTANT:"
    with pytest.raises(PreprocessError):
        format_prompt("<image> hi", has_image=False)


def test_format_conversation_spans():
    turns = [
        {"from": "human", "value": "What is it?\n<image>"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"},
        {"from": "gpt", "value": "Black"},
    ]
    text, spans = format_conversation(turns, system="SYS")
    assert text == "SYS USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT: Black</s>"
    assert [text[s:e] for s, e in spans] == ["A cat.</s>", "Black</s>"]
    # a leading gpt turn is skipped (LLaVA), a final empty gpt turn makes a generation prompt
    text2, spans2 = format_conversation([{"from": "gpt", "value": "x"}, turns[0], {"from": "gpt", "value": None}], system="SYS")
    assert text2 == "SYS USER: <image>\nWhat is it? ASSISTANT:" and spans2 == []
    with pytest.raises(PreprocessError, match="turn 1"):
        format_conversation([turns[0], turns[2]])


# ---- tokens --------------------------------------------------------------------------------------

def test_tokenizer_basics(tok, tmp_path):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_ID
    text = "USER: <image>\nWhat pattern is the small square? ASSISTANT:"
    ids = tok(text).input_ids
    assert ids[0] == BOS_ID and ids.count(IMAGE_ID) == 1 and UNK_ID not in ids
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    odd = "Any ASCII: ~`|{}[]^_ 0123456789 zqxj!"
    assert tok.decode(tok(odd).input_ids, skip_special_tokens=True) == odd and UNK_ID not in tok(odd).input_ids
    for answer in ("horizontal", "vertical", "checkered", "diagonal"):
        assert len(tok(" " + answer, add_special_tokens=False).input_ids) == 1
    tok.save_pretrained(str(tmp_path / "tok"))
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded(text).input_ids == ids and loaded.convert_tokens_to_ids("<image>") == IMAGE_ID
    assert loaded.decode(ids) == tok.decode(ids) and len(loaded) == len(tok)
    assert build_demo_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()  # deterministic


def test_tokenize_with_image_expansion(tok):
    text = format_prompt("What pattern is the small square?")
    plain = tok(text.replace("<image>", "")).input_ids
    ids = tokenize_with_image(text, tok, IMAGE_ID, 16, num_images=1)
    assert ids.dtype == np.int32 and (ids == IMAGE_ID).sum() == 16
    assert ids[0] == BOS_ID and (ids == BOS_ID).sum() == 1
    assert len(ids) == len(plain) + 16
    pos = np.flatnonzero(ids == IMAGE_ID)
    assert (np.diff(pos) == 1).all()  # contiguous
    ids2 = tokenize_with_image("<image> and <image>", tok, IMAGE_TOKEN_INDEX_ORIGINAL, 3, num_images=2)
    assert (ids2 == IMAGE_TOKEN_INDEX_ORIGINAL).sum() == 6 and ids2[0] == BOS_ID and ids2[1] == IMAGE_TOKEN_INDEX_ORIGINAL
    with pytest.raises(PreprocessError, match=r"1 <image> tag\(s\) but 2 image"):
        tokenize_with_image(text, tok, IMAGE_ID, 16, num_images=2)
    with pytest.raises(PreprocessError, match="0 <image>.*1 image"):
        tokenize_with_image("no image", tok, IMAGE_ID, 16, num_images=1)
    with pytest.raises(PreprocessError, match="empty"):
        tokenize_with_image("", tok, IMAGE_ID, 16)


def test_conversation_labels(tok):
    turns = [
        {"from": "human", "value": "<image>\nWhat pattern is the small square?"},
        {"from": "gpt", "value": "horizontal"},
        {"from": "human", "value": "Which pattern fills the small framed square?"},
        {"from": "gpt", "value": "checkered"},
    ]
    ids, labels = tokenize_conversation(turns, tok, IMAGE_ID, 8, max_len=512, num_images=1)
    assert ids.shape == labels.shape and labels.dtype == np.int32
    text, _ = format_conversation(turns)
    np.testing.assert_array_equal(ids, tokenize_with_image(text, tok, IMAGE_ID, 8))
    kept = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[kept], ids[kept])
    assert tok.decode(ids[kept]) == " horizontal</s> checkered</s>"
    assert not kept[ids == IMAGE_ID].any() and not kept[0]
    assert kept.sum() == 4  # one token per answer + one </s> each


def _llama_like_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style (Metaspace, prefix on every piece = Llama 'legacy') BPE for the LLaVA parity test."""
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    t.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    corpus = [SYSTEM_PROMPT, "USER: ASSISTANT: What colour is the cat? It is black. 42 yes no\n"] * 3
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False)
    t.train_from_iterator(corpus, trainer=trainer)
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _llava_tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX_ORIGINAL):  # llava/mm_utils.py
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X), strict=False) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def _llava_preprocess_v1_labels(conversation, tokenizer):  # llava/train/train.py preprocess_v1, legacy tokenizer
    input_ids = np.asarray(_llava_tokenizer_image_token(conversation, tokenizer))
    target = input_ids.copy()
    sep = " ASSISTANT: "
    rounds = conversation.split("</s>")
    cur_len = 1
    target[:cur_len] = IGNORE_INDEX
    for rou in rounds:
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(_llava_tokenizer_image_token(rou, tokenizer))
        instruction_len = len(_llava_tokenizer_image_token(parts[0], tokenizer)) - 2
        target[cur_len : cur_len + instruction_len] = IGNORE_INDEX
        cur_len += round_len
    target[cur_len:] = IGNORE_INDEX
    assert cur_len == len(input_ids), "tokenization mismatch"
    return input_ids, target


@pytest.mark.parametrize("answers", [("It is black.",), ("black", "42"), ("42 yes", "no"), ("it?", "it is")])
def test_labels_match_llava_preprocess_v1(answers):
    llama = _llama_like_tokenizer()
    turns = [{"from": "human", "value": "<image>\nWhat colour is the cat?"}]
    for k, a in enumerate(answers):
        if k:
            turns.append({"from": "human", "value": "What is it?"})
        turns.append({"from": "gpt", "value": a})
    text, _ = format_conversation(turns)
    ref_ids, ref_labels = _llava_preprocess_v1_labels(text, llama)
    ids, labels = tokenize_conversation(turns, llama, IMAGE_TOKEN_INDEX_ORIGINAL, 1, max_len=1024)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(labels, ref_labels)


def test_truncation(tok):
    turns = [{"from": "human", "value": "<image>\nWhat pattern is the small square?"}, {"from": "gpt", "value": "vertical"}]
    ids, labels = tokenize_conversation(turns, tok, IMAGE_ID, 8, max_len=256)
    n = len(ids)
    with pytest.raises(PreprocessError, match=f"{n} tokens.*max_len={n - 1}"):
        tokenize_conversation(turns, tok, IMAGE_ID, 8, max_len=n - 1)
    with pytest.warns(UserWarning, match="truncated"):
        ids2, labels2, cut = tokenize_conversation(
            turns, tok, IMAGE_ID, 8, max_len=n - 1, truncation="truncate", return_truncated=True
        )
    assert cut and len(ids2) == n - 1 and (labels2 == labels[: n - 1]).all()
    *_, cut = tokenize_conversation(turns, tok, IMAGE_ID, 8, max_len=n, return_truncated=True)
    assert not cut
    first_image = int(np.flatnonzero(ids == IMAGE_ID)[0])
    with pytest.raises(PreprocessError, match="image tokens"):
        tokenize_conversation(turns, tok, IMAGE_ID, 8, max_len=first_image + 2, truncation="truncate")


# ---- batches -------------------------------------------------------------------------------------

def test_bucket_length():
    assert BUCKETS == (64, 128, 256, 512, 1024, 2048)
    assert [bucket_length(n) for n in (0, 1, 64, 65, 2048)] == [64, 64, 64, 128, 2048]
    assert bucket_length(10, (8, 16)) == 16
    with pytest.raises(PreprocessError, match="2049"):
        bucket_length(2049)


def test_pad_batch_and_positions():
    ids, mask = pad_batch([[5, 6, 7], [8]], 4, pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[False, True, True, True], [False, False, False, True]])
    assert ids.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 1, 2], [0, 0, 0, 0]])
    ids_r, mask_r = pad_batch([[5, 6, 7], [8]], pad_id=IGNORE_INDEX, side="right")
    np.testing.assert_array_equal(ids_r, [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]])
    np.testing.assert_array_equal(positions_from_mask(mask_r), [[0, 1, 2], [0, 0, 0]])
    with pytest.raises(PreprocessError, match="sequence 1 has 5 tokens"):
        pad_batch([[1], [1, 2, 3, 4, 5]], 4)


# ---- bounded padding + resize (issue 17): bit for bit LLaVA's pad-then-resize ---------------------

_SIZES = [(640, 480), (480, 640), (1920, 1080), (1080, 1920), (337, 336), (336, 337), (1009, 1008), (500, 333), (333, 500),
          (1500, 400), (123, 1234), (2000, 21), (21, 2000), (1000, 1), (1, 1000), (15, 9)]


@pytest.mark.parametrize("out", [14, 56, 336, 1008])
def test_pad_and_resize_is_bitwise_llava(out):
    """pad_and_resize == expand2square + PIL bicubic resize, exactly, over aspect ratios, up/down-scaling, odd sizes."""
    from flexattn_jax.preprocess import pad_and_resize

    rng = np.random.default_rng(out)
    for w, h in _SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = _llava_expand2square(img, CLIP_MEAN_RGB).resize((out, out), resample=Image.Resampling.BICUBIC)
        np.testing.assert_array_equal(np.asarray(pad_and_resize(img, out)), np.asarray(ref), err_msg=f"{w}x{h} -> {out}")


def test_pad_and_resize_chunks_tall_images(monkeypatch):
    """A tall image's horizontal pass runs in chunks of rows; any chunk size gives the same bits."""
    import flexattn_jax.preprocess as pp

    img = Image.fromarray(np.random.default_rng(5).integers(0, 256, (700, 90, 3), dtype=np.uint8))
    ref = np.asarray(_llava_expand2square(img, CLIP_MEAN_RGB).resize((56, 56), resample=Image.Resampling.BICUBIC))
    for chunk in (1, 700 * 7, 700 * 64):
        monkeypatch.setattr(pp, "_CHUNK_PIXELS", chunk)
        np.testing.assert_array_equal(np.asarray(pp.pad_and_resize(img, 56)), ref)


def test_pad_and_resize_memory_is_bounded():
    """A 20000x2 image to 336: the padded square would be 1.2 GB; the bounded path's peak RSS grows by < 150 MB."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import resource; from PIL import Image; from flexattn_jax.preprocess import pad_and_resize\n"
        "img = Image.new('RGB', (20000, 2), (200, 10, 10))\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = pad_and_resize(img, 336)\n"
        "print(out.size, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, env=env)
    size, grown_kb = res.stdout.rsplit(" ", 1)
    assert size == "(336, 336)" and int(grown_kb) < 150_000, res.stdout


def test_image_size_limits(tmp_path, monkeypatch):
    """Absurd aspect ratios and pixel counts are a PreprocessError naming the file and the limit, before decoding."""
    import warnings

    import flexattn_jax.preprocess as pp

    path = _save(Image.new("RGB", (3000, 2)), tmp_path / "wide.png")
    with pytest.raises(PreprocessError, match=r"wide\.png: 3000x2 has an aspect ratio of 1500:1, more than the limit of 100:1"):
        load_image(path)
    assert load_image(path, max_aspect=2000).size == (3000, 2)  # the limit is configurable
    with pytest.raises(PreprocessError, match="aspect ratio"):
        preprocess_image(Image.new("RGB", (3000, 2)), 14)
    monkeypatch.setattr(pp, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(PreprocessError, match=r"wide\.png: 3000x2 is 6,000 pixels, more than the limit of 1,000"):
        load_image(path)
    monkeypatch.setattr(pp, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # PIL would warn (DecompressionBombWarning) at 6000 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path, max_aspect=2000).size == (3000, 2)


def test_longest_prompt_is_the_one_rule():
    """The largest bucket, or less when the answer's room in the model's context is smaller; the generate CLI's
    check and the server's limit read it."""
    from flexattn_jax.app.generate_cli import check_context
    from flexattn_jax.preprocess import BUCKETS, longest_prompt
    from tests.fixtures import tiny_config

    assert longest_prompt(4096, 128) == max(BUCKETS)
    assert longest_prompt(600, 100) == 500
    assert longest_prompt(600, 100, (64, 128)) == 128
    cfg = tiny_config()
    context = cfg.text.max_position_embeddings
    check_context(cfg, context - cfg.num_image_tokens - 2)  # room for the image, BOS and one prompt token
    with pytest.raises(ValueError, match="--max-new-tokens"):
        check_context(cfg, context - cfg.num_image_tokens - 1)
