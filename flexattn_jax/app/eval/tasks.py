"""What each task asks and how one answer is scored: prompts, per-item records, metrics.

Protocols (and where they come from):

- ``vstar`` / ``likelihood`` (the FlexAttention release, ``scripts/evaluation/eval_vbench.py``): one
  forward per option of ``"{system} USER: <image>\\n{question}\\nAnswer the question using a single
  word or phrase. ASSISTANT: {option}"``, the mean cross-entropy of the option's tokens; the lowest
  wins (the correct option is listed first).
- ``vstar`` / ``letter`` (LLaVA's multiple-choice prompt): the options lettered A, B, ... on their own
  lines in an order shuffled per sample (fixed by its id: the data lists the correct option first),
  then "Answer with the option's letter from the given choices directly."; greedy; parsed like
  MagnifierBench.
- ``magnifier`` (the release's ``eval_magnifier.py``): the instruction with its options moved to
  their own lines, then "Answer with the option's letter from the given choices directly.";
  greedy; :func:`flexattn_jax.app.eval.answers.parse_option_letter`.
- ``textvqa`` (the release's ``eval_textvqa.py``; LLaVA's ``eval_textvqa.py`` scorer): the question,
  then "Answer the question using a single word or phrase."; greedy; VQA soft accuracy. With
  ``ocr_tokens``, LLaVA's own prompt with the "Reference OCR token: ..." line between them (LLaVA's
  reported scale, not the release's).
- ``vqa``: the question and the short-answer instruction; greedy; exact match after normalisation,
  plus LLaVA's POPE yes/no accuracy, precision, recall and F1 when every answer is yes or no.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from flexattn_jax.app.eval.answers import exact_match, normalize_answer, parse_option_letter, pope_yes_no, vqa_soft_accuracy
from flexattn_jax.app.eval.data import Sample

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def magnifier_question(instruction: str) -> str:
    """The release's reformatting: each option of "... A. x, B. y, C. z, D. w" on its own line."""
    return instruction.replace(" A.", "\nA.").replace(", B.", "\nB.").replace(", C.", "\nC.").replace(", D.", "\nD.")


def lettered_options(sample: Sample) -> tuple[list[str], str]:
    """The options in a per-sample shuffled order (seeded by the sample id) and the correct letter."""
    order = list(range(len(sample.options)))
    random.Random(sample.id).shuffle(order)
    return [sample.options[i] for i in order], LETTERS[order.index(0)]


def user_text(task: str, sample: Sample, protocol: str = "likelihood", ocr_tokens: bool = False) -> str:
    """The user turn of a generation prompt (without ``<image>``), as the protocol words it."""
    if task == "magnifier":
        return f"{magnifier_question(sample.question)}\n{LETTER_ANSWER}"
    if task == "vstar":
        if protocol == "likelihood":
            return f"{sample.question}\n{SHORT_ANSWER}"
        options, _ = lettered_options(sample)
        lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
        return f"{sample.question}\n{lines}\n{LETTER_ANSWER}"
    if task == "textvqa" and ocr_tokens:
        if sample.ocr is None:
            raise ValueError(f"sample {sample.id!r}: --ocr-tokens needs OCR tokens (LLaVA's llava_textvqa_val_v051_ocr.jsonl)")
        return f"{sample.question}\n{sample.ocr}\n{SHORT_ANSWER}"
    return f"{sample.question}\n{SHORT_ANSWER}"


def item_key(sample: Sample, prompt: str, settings: dict[str, Any]) -> str:
    """Content hash of one item under one run's settings: resume re-runs an item whose inputs (its image's bytes
    included) changed."""
    from flexattn_jax.app.resume import image_sha256

    h = hashlib.sha1()
    path = None if isinstance(sample.image, bytes) else sample.image
    h.update(json.dumps([sample.id, path, image_sha256(sample.image), prompt, list(sample.options), settings],
                        sort_keys=True).encode())
    return h.hexdigest()[:16]


# ---- per-item scores ---------------------------------------------------------------------------------

def score_generation(task: str, sample: Sample, prompt_text: str, prediction: str, protocol: str = "letter") -> dict[str, Any]:
    """The fields a prediction adds to its record: the parsed answer and its score in [0, 1]."""
    if task in ("magnifier", "vstar"):
        if task == "vstar":
            _, truth = lettered_options(sample)
        else:
            truth = sample.answer
        parsed = parse_option_letter(prediction, prompt_text)
        return {"parsed": parsed, "truth": truth, "score": float(parsed == truth)}
    if task == "textvqa":
        return {"normalized": normalize_answer(prediction), "score": vqa_soft_accuracy(prediction, sample.answers)}
    record: dict[str, Any] = {"normalized": normalize_answer(prediction), "score": float(exact_match(prediction, sample.answers))}
    truth = normalize_answer(sample.answers[0])
    if len(sample.answers) == 1 and truth in ("yes", "no"):
        record.update(yes_no=pope_yes_no(prediction), label=truth)
    return record


def score_likelihood(losses: Sequence[float]) -> dict[str, Any]:
    """V* by likelihood: the option with the lowest mean token loss is the choice; option 0 is correct."""
    choice = min(range(len(losses)), key=lambda i: losses[i])
    return {"losses": [float(x) for x in losses], "choice": choice, "score": float(choice == 0)}


# ---- metrics -------------------------------------------------------------------------------------

def _pct(x: float) -> float:
    return round(100.0 * x, 2)


def pope_metrics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """LLaVA's POPE figures (percent): accuracy, precision, recall, F1 of 'yes', and the yes ratio."""
    tp = sum(r["yes_no"] == "yes" and r["label"] == "yes" for r in records)
    fp = sum(r["yes_no"] == "yes" and r["label"] == "no" for r in records)
    tn = sum(r["yes_no"] == "no" and r["label"] == "no" for r in records)
    fn = sum(r["yes_no"] == "no" and r["label"] == "yes" for r in records)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = max(len(records), 1)
    return {"accuracy": _pct((tp + tn) / n), "precision": _pct(precision), "recall": _pct(recall), "f1": _pct(f1),
            "yes_ratio": _pct((tp + fp) / n)}


def task_metrics(task: str, records: Sequence[dict[str, Any]], failures: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (percent) over all items, a failed item counting as wrong, overall and per category, beside the
    accuracy over the scored items only (``accuracy_scored``); failed items counted and named."""
    scored = [r for r in records if r.get("error") is None]
    items = len(scored) + len(failures)
    total = sum(r["score"] for r in scored)
    out: dict[str, Any] = {
        "task": task, "items": items, "scored": len(scored), "failed": len(failures),
        "failures": [{"id": f["id"], "error": f["error"]} for f in failures],
        "accuracy": _pct(total / items) if items else None,
        "accuracy_scored": _pct(total / len(scored)) if scored else None,
    }
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    failed_in: dict[str, int] = defaultdict(int)
    for r in scored:
        if r.get("category"):
            by_cat[r["category"]].append(r)
    for f in failures:
        if f.get("category"):
            failed_in[f["category"]] += 1
    if by_cat or failed_in:
        out["categories"] = {
            c: {"items": len(by_cat[c]) + failed_in[c], "scored": len(by_cat[c]),
                "accuracy": _pct(sum(r["score"] for r in by_cat[c]) / (len(by_cat[c]) + failed_in[c]))}
            for c in sorted(set(by_cat) | set(failed_in))}
    if task == "vqa" and scored and all("yes_no" in r for r in scored):
        out["pope"] = pope_metrics(scored)
        for c, rs in by_cat.items():
            out["categories"][c]["pope"] = pope_metrics(rs)
    flops = [r["tflops"] for r in scored if r.get("tflops") is not None]
    out["tflops_per_item"] = float(f"{sum(flops) / len(flops):.5g}") if flops else None
    return out
