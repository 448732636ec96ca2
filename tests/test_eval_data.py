"""The readers take each data set as its authors ship it; bad samples are named, layout errors name file and field."""

from __future__ import annotations

import json

import pytest

from flexattn_jax.app.eval.data import BadSample, EvalDataError, Sample, read_task

from .eval_fixtures import ANSWERS_10, write_magnifier, write_pope, write_textvqa, write_vstar


def _split(items):
    return [i for i in items if isinstance(i, Sample)], {b.id: b.error for b in items if isinstance(b, BadSample)}


def test_vstar(tmp_path):
    root = write_vstar(tmp_path / "vstar_bench")
    good, bad = _split(list(read_task("vstar", root)))
    assert [s.id for s in good] == ["direct_attributes/sa_1000", "direct_attributes/sa_1001", "direct_attributes/sa_1002",
                                    "relative_position/sa_1000", "relative_position/sa_1001"]
    assert good[1].options == ("blue", "green", "yellow", "red") and good[1].answer == "blue"
    assert good[1].image.endswith("direct_attributes/sa_1001.png") and good[0].category == "direct_attributes"
    assert good[0].load_image().size == (40, 30)
    assert "sa_broken.json: malformed JSON" in bad["direct_attributes/sa_broken"]
    assert "no image next to" in bad["relative_position/sa_noimage"]
    assert [s.id for s in read_task("vstar", root, limit=2)] == ["direct_attributes/sa_1000", "direct_attributes/sa_1001"]
    with pytest.raises(EvalDataError, match="not a V\\* Bench folder"):
        list(read_task("vstar", tmp_path))


def test_magnifier(tmp_path):
    root = write_magnifier(tmp_path / "MagnifierBench")
    good, bad = _split(list(read_task("magnifier", root)))
    assert [s.id for s in good] == ["MagnifierBench_0", "MagnifierBench_1", "MagnifierBench_2"]
    assert [s.answer for s in good] == ["A", "B", "C"] and good[0].load_image().size == (36, 48)
    assert "none of its image_ids ['img_missing']" in bad["MagnifierBench_lost"]
    (root / "data_instructions.json").write_text(json.dumps({"meta": {}, "rows": {}}))
    with pytest.raises(EvalDataError, match="data_instructions.json: expected a top-level field 'data'"):
        list(read_task("magnifier", root))
    with pytest.raises(EvalDataError, match="file not found: .*data_instructions.json"):
        list(read_task("magnifier", tmp_path))


def test_textvqa_official_and_llava_files(tmp_path):
    official, llava = write_textvqa(tmp_path / "textvqa")
    good, bad = _split(list(read_task("textvqa", official)))
    assert [s.id for s in good] == ["34602", "34603", "34604", "34605"] and not bad
    assert good[0].answers == tuple(ANSWERS_10) and good[0].image == str(tmp_path / "textvqa/train_images/003a8ae2ef43b901.jpg")
    assert good[0].ocr is None
    from_llava, _ = _split(list(read_task("textvqa", llava, annotations=official)))
    assert [(s.id, s.question, s.answers, s.image) for s in from_llava] == [(s.id, s.question, s.answers, s.image) for s in good]
    assert from_llava[0].ocr == "Reference OCR token: dakota, digital, single-use"
    with pytest.raises(EvalDataError, match="pass the official TextVQA_0.5.1_val.json as --annotations"):
        list(read_task("textvqa", llava))
    data = json.loads(official.read_text())
    data["data"][1]["answers"] = ["x"] * 9
    del data["data"][2]["question"]
    official.write_text(json.dumps(data))
    _, bad = _split(list(read_task("textvqa", official)))
    assert "data[1]: field 'answers' must be the 10 annotator answers" in bad["34603"]
    assert "data[2]: missing field 'question'" in bad["34604"]
    official.write_text(json.dumps(data["data"]))
    with pytest.raises(EvalDataError, match="TextVQA_0.5.1_val.json: expected the official TextVQA layout"):
        list(read_task("textvqa", official))


def test_vqa_jsonl(tmp_path):
    path = write_pope(tmp_path / "pope")
    good, bad = _split(list(read_task("vqa", path, images=tmp_path / "pope" / "val2014")))
    assert [(s.id, s.answers, s.category) for s in good] == [("0", ("yes",), "adversarial"), ("1", ("no",), "adversarial"),
                                                              ("2", ("yes",), "random"), ("3", ("no",), "random")]
    assert good[0].load_image().size == (40, 30)
    assert bad == {"line3": f"{path} line 3: malformed JSON: Unterminated string starting at (column 50)",
                   "10": f"{path} line 6: field 'answers' must be a string or a non-empty list of strings, got None"}


def test_jsonl_line_not_utf8_is_a_bad_sample_and_the_rest_is_read(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"image": "a.jpg", "question": "q?", "answers": "yes"}\n\xff\xfe\n\n'
                     b'{"image": "b.jpg", "question": "r?", "answers": "no"}\n')
    good, bad = _split(list(read_task("vqa", path)))
    assert [(s.question, s.answers) for s in good] == [("q?", ("yes",)), ("r?", ("no",))]
    assert bad == {"line2": f"{path} line 2: not UTF-8 text (invalid start byte at byte 0)"}
