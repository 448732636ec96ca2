"""VQA answer normalisation and scores, POPE yes/no, MagnifierBench's letter parser, prompts, metrics."""

from __future__ import annotations

import pytest

from flexattn_jax.app.eval.answers import exact_match, normalize_answer, parse_option_letter, pope_yes_no, vqa_soft_accuracy
from flexattn_jax.app.eval.data import Sample
from flexattn_jax.app.eval.tasks import lettered_options, magnifier_question, pope_metrics, task_metrics, user_text

# (raw answer, normal form), each from one rule of the official VQA evaluation (EvalAI's answer processor)
NORMALISATION = [
    ("Yes", "yes"),  # lower case
    ("No.", "no"),  # a period not followed by a digit is removed
    ("  yes\n", "yes"),  # whitespace, newlines
    ("\tStop\n", "stop"),
    ("The cat", "cat"),  # articles dropped
    ("a dog", "dog"),
    ("an apple", "apple"),
    ("the the", ""),
    ("two", "2"),  # number words to digits
    ("Ten dollars", "10 dollars"),
    ("none", "0"),
    ("zero", "0"),
    ("twenty", "twenty"),  # only none, zero .. ten are mapped
    ("dont know", "don't know"),  # contractions restored
    ("isnt it", "isn't it"),
    ("youre right", "you're right"),
    ("whats up", "what's up"),
    ("Coca-Cola", "coca cola"),  # punctuation not touching a space becomes a space
    ("coca - cola", "coca cola"),  # punctuation touching a space is removed
    ("hello!", "hello"),
    ("(left)", "left"),
    ("yes/no", "yes no"),
    ("What?", "what"),  # '?' and ',' dropped first
    ("1,000", "1000"),
    ("Yes, it is", "yes it is"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("U.S.A.", "usa"),
    ("man's hat", "man 's hat"),  # the possessive is split off
    ("two-way", "2 way"),
    ("A", ""),  # a lone article is nothing
]


@pytest.mark.parametrize("raw,want", NORMALISATION)
def test_normalisation(raw, want):
    assert normalize_answer(raw) == want


def test_period_strip_stops_after_32_like_the_reference():
    assert normalize_answer("." * 40 + "x") == "." * 8 + "x"


@pytest.mark.parametrize("matches,score", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_accuracy_is_the_leave_one_out_mean(matches, score):
    answers = ["Two"] * matches + [f"other {i}" for i in range(10 - matches)]
    assert vqa_soft_accuracy("2", answers) == pytest.approx(score)


def test_soft_accuracy_normalises_both_sides_and_needs_annotators():
    assert vqa_soft_accuracy("The Dakota.", ["dakota"] * 3 + ["x"] * 7) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="annotators"):
        vqa_soft_accuracy("x", ["x"])
    assert exact_match("Yes.", ["yes"]) and not exact_match("yes sir", ["yes"])


@pytest.mark.parametrize("pred,label", [("Yes, there is a dog.", "yes"), ("No, there is not.", "no"), ("There is not a dog", "no"),
                                        ("no", "no"), ("I see it. No doubt", "yes"), ("Nope", "yes")])
def test_pope_reads_the_first_sentence_like_llava(pred, label):
    assert pope_yes_no(pred) == label


Q_LINES = "What is on the square?\nA. cup\nB. pen\nC. key\nD. nothing"
Q_LIST = "What is on the square? A. cup, B. pen, C. key, D. nothing"


@pytest.mark.parametrize("pred,question,want", [
    ("The answer is C", Q_LINES, "C"),
    ("B", Q_LINES, "B"),
    ("C. key", Q_LINES, "C"),
    ("Answer: D", Q_LINES, "A"),  # the release checks A first, case-sensitively: 'Answer' has an A
    ("b. the red car", Q_LINES, "A"),  # then upper-cases: 'CAR' has an A
    ("none", Q_LINES, "other"),
    ("pen", Q_LIST, "B"),  # an option text, when the question lists "A. .., B. .., C. .., D. .."
    ("pen", Q_LINES, "other"),  # the release passes the reformatted question, where that never matches
])
def test_magnifier_parser_follows_the_release(pred, question, want):
    assert parse_option_letter(pred, question) == want


def test_prompts():
    assert magnifier_question(Q_LIST) == Q_LINES
    s = Sample("x", "a.jpg", Q_LIST, answer="B")
    assert user_text("magnifier", s) == Q_LINES + "\nAnswer with the option's letter from the given choices directly."
    v = Sample("direct_attributes/sa_1", "a.jpg", "What colour?", options=("red", "blue", "green", "pink"))
    assert user_text("vstar", v) == "What colour?\nAnswer the question using a single word or phrase."
    options, letter = lettered_options(v)
    assert sorted(options) == sorted(v.options) and options["ABCD".index(letter)] == "red"
    assert lettered_options(v) == (options, letter)  # fixed per sample
    assert len({lettered_options(Sample(f"s{i}", "a", "q", options=v.options))[1] for i in range(20)}) > 1  # not always A
    letter_prompt = user_text("vstar", v, "letter")
    assert letter_prompt.splitlines()[1:] == [f"{c}. {o}" for c, o in zip("ABCD", options, strict=True)] + [
        "Answer with the option's letter from the given choices directly."]
    t = Sample("1", "a.jpg", "what brand?", answers=("x",) * 10, ocr="Reference OCR token: dakota")
    assert user_text("textvqa", t) == "what brand?\nAnswer the question using a single word or phrase."
    assert user_text("textvqa", t, ocr_tokens=True) == (
        "what brand?\nReference OCR token: dakota\nAnswer the question using a single word or phrase.")
    with pytest.raises(ValueError, match="--ocr-tokens needs OCR tokens"):
        user_text("textvqa", Sample("2", "a.jpg", "q", answers=("x",) * 10), ocr_tokens=True)


def test_metrics_per_category_pope_and_failures():
    recs = [{"id": str(i), "category": c, "score": float(y == p), "yes_no": p, "label": y, "tflops": 2.0, "error": None}
            for i, (c, y, p) in enumerate([("random", "yes", "yes"), ("random", "no", "yes"), ("adversarial", "no", "no"),
                                           ("adversarial", "yes", "no")])]
    m = task_metrics("vqa", recs, [{"id": "9", "error": "image file not found: x.jpg", "category": "random"}])
    # the headline counts the failed item as wrong (2 of 5), beside the accuracy over the 4 scored
    assert (m["items"], m["scored"], m["failed"], m["accuracy"], m["accuracy_scored"]) == (5, 4, 1, 40.0, 50.0)
    assert m["failures"] == [{"id": "9", "error": "image file not found: x.jpg"}]
    assert m["categories"]["random"] == {"items": 3, "scored": 2, "accuracy": 33.33, "pope": m["categories"]["random"]["pope"]}
    assert m["categories"]["adversarial"]["accuracy"] == 50.0 and m["tflops_per_item"] == 2.0
    nothing = task_metrics("vqa", [], [{"id": "1", "error": "x"}])
    assert (nothing["accuracy"], nothing["accuracy_scored"], nothing["scored"]) == (0.0, None, 0)
    assert m["pope"] == {"accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0, "yes_ratio": 50.0}
    assert pope_metrics(recs[:1]) == {"accuracy": 100.0, "precision": 100.0, "recall": 100.0, "f1": 100.0, "yes_ratio": 100.0}
