"""The training data pipeline: labels and learnable rows, bad inputs, determinism, resume, process slices."""

import json
import shutil
import warnings

import numpy as np
import pytest

from flexattn_jax.app import demo_data
from flexattn_jax.app.demo_data import build_demo_tokenizer
from flexattn_jax.config import IGNORE_INDEX
from flexattn_jax.selection import answer_targets, learnable_rows
from tests.fixtures import TEST_SEQ_LEN, tiny_config, write_llava_dataset
from train.config import DataConfig
from train.data import BatchPlan, DataError, TrainData, read_records

CFG = tiny_config()


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    write_llava_dataset(root, seed=0, n=16, hr_size=84, obj_px=6)
    return root


def make_data(root, tokenizer, records=None, batch=4, **kw):
    dcfg = DataConfig(data=str(root / "data.json"), images=str(root), max_len=TEST_SEQ_LEN, **kw)
    return TrainData(CFG, dcfg, tokenizer, batch, records=records)


def test_learnable_rows():
    labels = np.array([-100, -100, 5, 6, -100, -100, 7, -100], np.int32)
    rows, valid, n = learnable_rows(labels, True, 6)
    assert n == 3 and rows[valid].tolist() == [1, 2, 5]  # spans 2..3 and 6..6 -> rows 1..2 and 5
    rows, valid, n = learnable_rows(labels, True, 2)
    assert n == 3 and rows[valid].tolist() == [1, 2]  # capped
    assert not learnable_rows(labels, False, 6)[1].any()  # text-only samples have no select rows


def test_answer_targets():
    """Row t's target counts when token t+1 is labelled: one rule for the training loss (jax), the option likelihood
    and the learnable rows (numpy)."""
    import jax.numpy as jnp

    labels = np.array([[-100, -100, 5, 6, -100, -100, 7, -100], [-100, 4, -100, -100, -100, -100, -100, 9]], np.int32)
    want = [[False, True, True, False, False, True, False], [True, False, False, False, False, False, True]]
    assert answer_targets(labels).tolist() == want
    assert np.asarray(answer_targets(jnp.asarray(labels))).tolist() == want
    assert learnable_rows(labels[1], True, 4)[0][:2].tolist() == [0, 6]


def test_batches_labels_and_rows(dataset, tokenizer):
    data = make_data(dataset, tokenizer)
    b = next(data.iterator())
    assert b["input_ids"].shape == (4, TEST_SEQ_LEN) and b["pixel_values"].shape == (4, 84, 84, 3)
    for i in range(4):
        ids, lab, mask = b["input_ids"][i], b["labels"][i], b["attention_mask"][i]
        assert (ids == CFG.image_token_id).sum() == CFG.num_image_tokens
        assert (lab[ids == CFG.image_token_id] == IGNORE_INDEX).all() and (lab[~mask] == IGNORE_INDEX).all()
        answer = tokenizer.decode(ids[lab != IGNORE_INDEX])
        assert answer.strip().removesuffix("</s>") in demo_data.CLASSES
        rows = b["select_rows"][i][b["select_valid"][i]]
        assert (lab[rows + 1] != IGNORE_INDEX).all() and len(rows) == (lab != IGNORE_INDEX).sum()


def test_deterministic_resumable_and_process_sliced(dataset, tokenizer):
    a, b = make_data(dataset, tokenizer, seed=3), make_data(dataset, tokenizer, seed=3)
    ia, ib = a.iterator(), b.iterator()
    first = [next(ia) for _ in range(2)]
    assert all(np.array_equal(x["input_ids"], next(ib)["input_ids"]) for x in first)
    state = ia.get_state()
    after = next(ia)
    ic = make_data(dataset, tokenizer, seed=3).iterator()
    ic.set_state(state)
    assert np.array_equal(next(ic)["_index"], after["_index"])
    other = next(make_data(dataset, tokenizer, seed=4).iterator())
    assert not np.array_equal(other["_index"], first[0]["_index"])
    # two processes read disjoint halves of each global batch; together they are the 1-process batch
    plans = [BatchPlan(a.lengths, 4, 2, p, 2, 1, seed=3) for p in range(2)]
    single = BatchPlan(a.lengths, 4, 2, 0, 1, 1, seed=3)
    got = [plans[p][j][0] for j in range(2) for p in range(2)]  # micro 0: p0, p1; micro 1: p0, p1
    assert got == [single[j][0] for j in range(4)]
    # every epoch is a fresh permutation; the plan covers exactly the requested epochs (the scan left no skips to cover)
    plan = BatchPlan(a.lengths, 4, 1, 0, 1, 2, seed=3)
    e0, e1 = ([plan[j][0] for j in range(16 * e, 16 * e + 16)] for e in (0, 1))
    assert sorted(e0) == sorted(e1) == list(range(16)) and e0 != e1 and plan[16][1] == 1
    assert make_data(dataset, tokenizer).plan.num_epochs == 1 and TrainData(
        CFG, a.dcfg, tokenizer, 4, epochs=3).plan.num_epochs == 3
    # a plan over the usable records only: each epoch permutes exactly them
    usable = np.array([0, 2, 3, 5, 7, 8, 11, 12])
    plan = BatchPlan(a.lengths, 4, 1, 0, 1, 1, seed=3, usable=usable)
    assert sorted(plan[j][0] for j in range(len(plan))) == usable.tolist()


def test_bad_inputs_are_counted_and_skipped(dataset, tokenizer):
    records = json.loads((dataset / "data.json").read_text())[:8]
    records[1]["image"] = "images/does-not-exist.png"
    records[2]["conversations"][0]["value"] = "no tag here"
    records[3]["conversations"][1]["value"] = "word " * 200  # over max_len
    records[4] = {"id": "broken", "conversations": "not a list"}
    records.append({"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]})
    data = make_data(dataset, tokenizer, records=records, batch=2, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = data.iterator()
        batches = [next(it) for _ in range(2)]
    seen = np.concatenate([b["_index"] for b in batches]).tolist()
    assert seen == [0, 5, 6, 7]
    assert data.stats()["skipped"] == {"missing_image": 1, "image_tag": 1, "too_long": 1, "malformed": 1}
    # the same data with on_error='raise' stops with a message naming the sample and the reason
    strict = make_data(dataset, tokenizer, records=records, batch=2, shuffle=False, on_error="raise")
    with pytest.raises(Exception, match=r"does-not-exist.png.*missing_image"):
        next(strict.iterator())
    # add_image_tag repairs the tagless sample; truncate cuts the long one instead of dropping it
    lenient = make_data(dataset, tokenizer, records=records, batch=2, shuffle=False, add_image_tag=True, truncation="truncate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = lenient.iterator()
        seen = np.concatenate([next(it)["_index"] for _ in range(3)]).tolist()
    assert seen == [0, 2, 3, 5, 6, 7]


def test_malformed_json_file(tmp_path, dataset, tokenizer):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1, "conversations": [}]')
    with pytest.raises(DataError, match=r"bad.json: malformed JSON at line 1 column"):
        read_records(bad)
    lines = tmp_path / "data.jsonl"
    good = json.loads((dataset / "data.json").read_text())[:3]
    lines.write_text("\n".join([json.dumps(good[0]), "{oops", json.dumps(good[1]), json.dumps(good[2])]) + "\n")
    recs = read_records(lines)
    assert len(recs) == 4 and "__malformed__" in recs[1]
    with pytest.raises(DataError, match="image folder|not found"):
        shutil.copy(lines, tmp_path / "x.jsonl")
        data = TrainData(CFG, DataConfig(data=str(lines), images="", max_len=TEST_SEQ_LEN, on_error="raise"), tokenizer, 2)
        next(data.iterator())
    with pytest.raises(DataError, match="vocab_size"):
        TrainData(tiny_config(vocab_size=64), DataConfig(data=str(lines), max_len=TEST_SEQ_LEN), tokenizer, 2)
