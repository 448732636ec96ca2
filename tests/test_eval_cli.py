"""`flexattn-jax eval` end to end on format-faithful fixtures with a tiny converted checkpoint: every task,
bad samples counted and named, resume after a kill, a budget sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flexattn_jax.app.cli import main
from flexattn_jax.app.eval import runner as R
from flexattn_jax.app.eval.answers import normalize_answer, parse_option_letter, vqa_soft_accuracy
from flexattn_jax.app.eval.likelihood import OptionScorer

from .checkpoints import write_tiny_checkpoint
from .eval_fixtures import write_magnifier, write_pope, write_textvqa, write_vstar

VOLATILE = ("wall_s", "answered_now", "pipeline")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    official, llava = write_textvqa(d / "textvqa")
    return {
        "common": ["--checkpoint", str(write_tiny_checkpoint(d / "ckpt")), "--no-compile-cache", "--no-progress",
                   "--max-new-tokens", "3", "--batch-size", "8"],
        "vstar": write_vstar(d / "vstar_bench"), "magnifier": write_magnifier(d / "MagnifierBench"),
        "textvqa": official, "llava": llava, "pope": write_pope(d / "pope"),
    }


def _run(env, task, out, *extra):
    rc = main(["eval", task, "--data", str(env[task if task != "vqa" else "pope"]), "--out", str(out), *env["common"], *extra])
    lines = (out / R.PREDICTIONS).read_text().splitlines() if (out / R.PREDICTIONS).exists() else []
    assert not lines or json.loads(lines[0])["flexattn_jax"] == "eval predictions"  # the header record first
    records = [json.loads(line) for line in lines[1:]]
    metrics = json.loads((out / R.METRICS).read_text()) if rc == 0 else None
    return rc, records, metrics


def _stable(m):
    return {k: v for k, v in m.items() if k not in VOLATILE}


def test_vstar_likelihood_and_resume_after_a_kill(env, tmp_path, monkeypatch, capsys):
    rc, records, m = _run(env, "vstar", tmp_path / "full")
    assert rc == 0
    assert "V* by option likelihood: select rows = each option's learnable rows" in capsys.readouterr().err
    assert (m["items"], m["scored"], m["failed"], m["protocol"], m["mode"]) == (7, 5, 2, "likelihood", "release")
    _check_lmms(tmp_path / "full", records, m, "likelihood", "learnable")
    assert {f["id"] for f in m["failures"]} == {"direct_attributes/sa_broken", "relative_position/sa_noimage"}
    for r in records:
        assert len(r["losses"]) == (4 if r["category"] == "direct_attributes" else 2)
        assert r["choice"] == int(np.argmin(r["losses"])) and r["score"] == float(r["choice"] == 0) and r["tflops"] > 0
    assert m["accuracy"] == pytest.approx(100 * sum(r["score"] for r in records) / 7, abs=0.01)  # a failure counts as wrong
    assert m["accuracy_scored"] == pytest.approx(100 * np.mean([r["score"] for r in records]), abs=0.01)
    assert set(m["categories"]) == {"direct_attributes", "relative_position"} and m["tflops_per_item"] > 0

    # a kill after two questions (the scorer raises), and a last line cut in the middle of writing
    real_score = OptionScorer.score

    def killed(self, questions):
        for n, out in enumerate(real_score(self, questions)):
            if n == 2:
                raise KeyboardInterrupt
            yield out

    monkeypatch.setattr(OptionScorer, "score", killed)
    out = tmp_path / "killed"
    rc, partial, _ = _run(env, "vstar", out)
    assert rc == 130 and len(partial) == 2
    with open(out / R.PREDICTIONS, "a") as f:
        f.write('{"id": "direct_attributes/sa_1002", "key": "0123')
    monkeypatch.setattr(OptionScorer, "score", real_score)
    rc, resumed, m2 = _run(env, "vstar", out)
    assert rc == 0 and "resuming: 2 of 5 items already answered" in capsys.readouterr().err
    assert m2["answered_now"] == 3 and len(resumed) == 5  # the cut line is gone, the others answered once
    assert _stable(m2) == _stable(m)


def _check_lmms(out, records, m, protocol, rows):
    """results.json / samples_vstar_bench.jsonl in lmms-eval's layout and names, agreeing with metrics.json."""
    res = json.loads((out / "results.json").read_text())
    assert {"results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config"} <= set(res)
    r = res["results"]["vstar_bench"]
    assert r["alias"] == "vstar_bench" and r["vstar_overall_acc,none"] == m["accuracy_scored"] and r["samples"] == m["scored"]
    assert (r["protocol"], r["select_rows"]) == (protocol, rows) == (res["configs"]["vstar_bench"]["protocol"],
                                                                     res["configs"]["vstar_bench"]["select_rows"])
    for cat, v in m["categories"].items():
        assert r[f"vstar_{cat}_acc,none"] == v.get("accuracy_scored", v["accuracy"])
    lines = [json.loads(x) for x in (out / "samples_vstar_bench.jsonl").read_text().splitlines()]
    assert len(lines) == len(records) and [x["id"] for x in lines] == [rec["id"] for rec in records]
    for x, rec in zip(lines, records, strict=True):
        entry = x["vstar_overall_acc"]
        assert entry == x[f"vstar_{rec['category']}_acc"] and entry["score"] == rec["score"]
        assert (entry["prediction"] == entry["ground_truth"]) == (rec["score"] == 1.0) and {"doc_id", "input", "target",
                                                                                             "filtered_resps"} <= set(x)
    # the categories' accuracy recomputed from the samples, as lmms-eval's vstar_aggregate_results does (0-100)
    assert 100 * np.mean([x["vstar_overall_acc"]["score"] for x in lines]) == pytest.approx(r["vstar_overall_acc,none"], abs=0.01)


def test_generation_tasks_score_their_predictions(env, tmp_path, capsys):
    rc, recs, m = _run(env, "magnifier", tmp_path / "mag")
    assert rc == 0 and (m["scored"], m["failed"]) == (3, 1) and m["failures"][0]["id"] == "MagnifierBench_lost"
    for r in recs:
        assert r["prompt"].endswith("D. nothing\nAnswer with the option's letter from the given choices directly.")
        assert r["parsed"] == parse_option_letter(r["prediction"], r["prompt"]) and r["score"] == float(r["parsed"] == r["truth"])

    rc, recs, m = _run(env, "vstar", tmp_path / "letter", "--protocol", "letter")
    assert rc == 0 and m["protocol"] == "letter" and m["scored"] == 5
    assert all(r["prompt"].splitlines()[1].startswith("A. ") and r["truth"] in "ABCD" for r in recs)
    _check_lmms(tmp_path / "letter", recs, m, "letter", "last")

    rc, recs, m = _run(env, "textvqa", tmp_path / "textvqa")
    assert rc == 0 and (m["scored"], m["failed"]) == (3, 1)
    assert m["failures"] == [{"id": "34605", "error": f"image file not found: {env['textvqa'].parent}/train_images/0000missing00000.jpg"}]
    answers = {q["question_id"]: q["answers"] for q in json.loads(env["textvqa"].read_text())["data"]}
    for r in recs:
        if r["error"] is None:
            assert r["score"] == vqa_soft_accuracy(r["prediction"], answers[int(r["id"])]) and "OCR" not in r["prompt"]
    assert m["accuracy_scored"] == pytest.approx(100 * np.mean([r["score"] for r in recs if r["error"] is None]), abs=0.01)
    assert m["accuracy"] == pytest.approx(100 * sum(r["score"] for r in recs if r["error"] is None) / 4, abs=0.01)
    res = json.loads((tmp_path / "textvqa" / "results.json").read_text())
    assert res["results"]["textvqa_val"]["exact_match,none"] == pytest.approx(m["accuracy_scored"] / 100, abs=1e-4)
    lines = [json.loads(x) for x in (tmp_path / "textvqa" / "samples_textvqa_val.jsonl").read_text().splitlines()]
    assert [x["exact_match"] for x in lines] == [r["score"] for r in recs if r["error"] is None]
    assert res["configs"]["textvqa_val"]["ocr_tokens"] is False and res["n-samples"]["textvqa_val"] == {"original": 4, "effective": 3}

    rc, recs, m = _run(env, "textvqa", tmp_path / "ocr", "--data", str(env["llava"]), "--annotations", str(env["textvqa"]),
                       "--ocr-tokens")
    assert rc == 0 and m["ocr_tokens"] and m["scored"] == 3
    assert all("\nReference OCR token: dakota, digital, single-use\n" in r["prompt"] for r in recs)
    assert "with OCR tokens (LLaVA's prompt)" in capsys.readouterr().out


def test_generation_resume_after_a_kill(env, tmp_path, monkeypatch):
    _, _, full = _run(env, "vqa", tmp_path / "full", "--images", str(env["pope"].parent / "val2014"))
    real = R.stream_answers

    def killed(*a, **kw):
        for n, out in enumerate(real(*a, **kw)):
            if n == 2:
                raise KeyboardInterrupt
            yield out

    monkeypatch.setattr(R, "stream_answers", killed)
    out = tmp_path / "killed"
    rc, partial, _ = _run(env, "vqa", out, "--images", str(env["pope"].parent / "val2014"))
    assert rc == 130 and len(partial) == 2
    monkeypatch.setattr(R, "stream_answers", real)
    rc, records, resumed = _run(env, "vqa", out, "--images", str(env["pope"].parent / "val2014"))
    assert rc == 0 and resumed["answered_now"] == 2 and len(records) == 4
    assert _stable(resumed) == _stable(full)
    assert full["failed"] == 2 and "pope" in full and set(full["categories"]) == {"adversarial", "random"}
    assert all(r["yes_no"] in ("yes", "no") and r["label"] == normalize_answer(r["label"]) for r in records)


def test_budget_sweep_writes_table_and_plot(env, tmp_path, capsys):
    rc = main(["eval", "vqa", "--data", str(env["pope"]), "--images", str(env["pope"].parent / "val2014"), "--out",
               str(tmp_path), "--sweep-budget", "0.25,all", *env["common"]])
    assert rc == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())["budgets"]
    assert [(b["hr_budget"], b["hr_budget_tokens"]) for b in sweep] == [("0.25", 9), ("all", 36)]
    assert 0 < sweep[0]["tflops_per_item"] < sweep[1]["tflops_per_item"]  # fewer HR tokens, fewer FLOPs
    assert (tmp_path / "budget-0.25" / R.METRICS).exists() and (tmp_path / "budget-all" / R.PREDICTIONS).exists()
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "K tokens  accuracy %  TFLOPs/item" in capsys.readouterr().out


def test_bad_arguments_and_layouts(env, tmp_path, capsys):
    assert main(["eval", "textvqa", "--data", str(env["textvqa"]), "--protocol", "letter", *env["common"]]) == 2
    assert "--protocol and --mode apply to vstar only" in capsys.readouterr().err
    assert main(["eval", "magnifier", "--data", str(tmp_path), *env["common"]]) == 2
    assert f"MagnifierBench instructions: file not found: {tmp_path}/data_instructions.json" in capsys.readouterr().err
    assert main(["eval", "textvqa", "--data", str(env["llava"]), *env["common"]]) == 2
    assert "pass the official TextVQA_0.5.1_val.json as --annotations" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "eval_vbench.py" in text and "eval_magnifier.py" in text and "m4c evaluator" in text


def test_predictions_file_of_another_kind_is_refused(tmp_path):
    from flexattn_jax.app.inference import GenerationOptions

    path = tmp_path / R.PREDICTIONS
    settings = R.EvalSettings("vqa", generation=GenerationOptions(max_new_tokens=3), checkpoint={"params_digest": "p"})
    header = R.predictions_header(settings)
    top = json.dumps(header) + "\n"
    path.write_text(top + '{"key": "a", "error": null}\nnot json\n{"key": "b", "error": null}\n')
    with pytest.raises(ValueError, match="line 3 is not a record of this command"):
        R.read_predictions(path, header)
    path.write_text(top + '{"key": "a", "error": null}\n{"key": "b", "error": "x"}\n{"key": "c", "err')
    assert list(R.read_predictions(path, header)) == ["a"]  # failed items are retried; the cut line is removed
    assert path.read_text() == top + '{"key": "a", "error": null}\n{"key": "b", "error": "x"}\n'
    other = R.predictions_header(R.EvalSettings("vqa", generation=GenerationOptions(max_new_tokens=4), checkpoint={"params_digest": "p"}))
    with pytest.raises(ValueError, match=r"another run; changed: max_new_tokens \(file 3, now 4\)"):
        R.read_predictions(path, other)
    for foreign in (b'{"key": "a", "error": null}', b'{"key": "a", "error": null}\n', b"x"):  # not ours, whatever the last byte
        path.write_bytes(foreign)
        with pytest.raises(ValueError, match="was not written by this command"):
            R.read_predictions(path, header)
        assert path.read_bytes() == foreign
