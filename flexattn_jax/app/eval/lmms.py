"""lmms-eval's output files for one eval run, so scores compare with the field's: ``results.json`` and ``samples_<task>.jsonl``.

The layout follows lmms-eval (``lmms_eval/evaluator.py`` ``results_dict``, ``loggers/evaluation_tracker.py``):
``results`` (per task: ``alias``, ``"<metric>,none"``, ``"<metric>_stderr,none"``, ``samples``),
``group_subtasks``, ``configs``, ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``, ``config``
and ``date``; one JSON line per scored item with ``doc_id``, ``input``, ``target``, ``filtered_resps`` and
the item's metric entries. Task and metric names are lmms-eval's where it has the task: V* is
``vstar_bench`` with ``vstar_overall_acc`` and ``vstar_{category}_acc`` (0-100, its
``vstar_aggregate_results``), TextVQA is ``textvqa_val`` with ``exact_match`` (the VQA soft accuracy,
0-1), POPE-style yes/no data is ``pope`` with ``pope_accuracy`` ... ``pope_yes_ratio`` (0-1).
MagnifierBench (``magnifierbench``, ``magnifier_acc`` 0-100) and generic ``vqa`` (``exact_match``) have no
lmms-eval task. Each result also names the protocol that produced it and its select rows, since
lmms-eval's ``vstar_bench`` is the letter protocol and the FlexAttention paper's is the likelihood one.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from flexattn_jax.app.eval.data import Sample
from flexattn_jax.config import ModelConfig

RESULTS = "results.json"
TASK_VERSION = 1  # of the protocols below; bump when a prompt or scorer changes


def task_name(task: str, records: Sequence[dict[str, Any]]) -> str:
    """lmms-eval's name of the task (ours where it has none)."""
    if task == "vqa":
        return "pope" if records and all("yes_no" in r for r in records) else "vqa"
    return {"vstar": "vstar_bench", "textvqa": "textvqa_val", "magnifier": "magnifierbench"}[task]


def select_rows(cfg: ModelConfig, protocol: str) -> str | None:
    """Which rows see the HR tokens: 'learnable' (each scored option token's row), 'last' (the newest token), 'all'."""
    if not cfg.flex.enabled:
        return None
    if cfg.flex.hr_mode == "paper":
        return "all"
    return "learnable" if protocol == "likelihood" else "last"


def _stderr(scores: Sequence[float]) -> float | str:
    """lmms-eval's ``mean_stderr``: the sample standard deviation over sqrt(n) ('N/A' below 2 items)."""
    n = len(scores)
    if n < 2:
        return "N/A"
    mean = sum(scores) / n
    return math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1) / n)


def _sample_metrics(task: str, name: str, rec: dict[str, Any], sample: Sample, pred: Any, truth: Any) -> dict[str, Any]:
    entry = {"question_id": sample.id, "score": rec["score"], "prediction": pred, "ground_truth": truth}
    if name == "vstar_bench":
        entry["category"] = sample.category
        return {f"vstar_{sample.category}_acc": entry, "vstar_overall_acc": entry}
    if name == "pope":
        entry = {"question_id": sample.id, "score": float(rec["yes_no"] == rec["label"]), "prediction": rec["yes_no"],
                 "ground_truth": rec["label"]}
        return {m: entry for m in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")}
    if name == "magnifierbench":
        return {"magnifier_acc": entry}
    return {"exact_match": rec["score"]}


def sample_line(task: str, name: str, doc_id: int, rec: dict[str, Any], sample: Sample, protocol: str) -> dict[str, Any]:
    """One ``samples_<task>.jsonl`` entry: lmms-eval's fields plus our sample id and the option losses."""
    if task == "vstar" and protocol == "likelihood":
        pred, truth = sample.options[rec["choice"]], sample.options[0]
        out = {"doc_id": doc_id, "id": sample.id, "input": rec["prompt"], "target": truth, "filtered_resps": pred,
               "resps": rec["losses"]}
    else:
        truth = rec.get("truth") if task in ("vstar", "magnifier") else list(sample.answers)
        pred = rec.get("parsed") if task in ("vstar", "magnifier") else rec.get("normalized")
        out = {"doc_id": doc_id, "id": sample.id, "input": rec["prompt"], "target": truth, "filtered_resps": rec["prediction"]}
    out.update(_sample_metrics(task, name, rec, sample, pred, truth))
    return out


def aggregate(task: str, name: str, records: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """The task's ``results`` entry (metric values on lmms-eval's scales)."""
    scores = [float(r["score"]) for r in records]
    out: dict[str, Any] = {"alias": name}
    if name == "vstar_bench" or name == "magnifierbench":
        key = "vstar_overall_acc" if name == "vstar_bench" else "magnifier_acc"
        # lmms-eval aggregates the samples it wrote: the scored items (eval's headline also counts failures as wrong)
        out[f"{key},none"] = metrics.get("accuracy_scored", metrics["accuracy"])
        out[f"{key}_stderr,none"] = "N/A"
        if name == "vstar_bench":
            for cat, m in (metrics.get("categories") or {}).items():
                out[f"vstar_{cat}_acc,none"] = m.get("accuracy_scored", m["accuracy"])
                out[f"vstar_{cat}_acc_stderr,none"] = "N/A"
    elif name == "pope":
        for k, m in (("accuracy", "pope_accuracy"), ("precision", "pope_precision"), ("recall", "pope_recall"),
                     ("f1", "pope_f1_score"), ("yes_ratio", "pope_yes_ratio")):
            out[f"{m},none"] = round(metrics["pope"][k] / 100.0, 6)
            out[f"{m}_stderr,none"] = "N/A"
    else:
        out["exact_match,none"] = sum(scores) / len(scores) if scores else None
        out["exact_match_stderr,none"] = _stderr(scores)
    out["samples"] = len(records)
    return out


def write_lmms(
    out: str | Path,
    task: str,
    protocol: str,
    cfg: ModelConfig,
    settings: dict[str, Any],
    records: Sequence[dict[str, Any]],
    samples: Sequence[Sample],
    doc_ids: Sequence[int],
    metrics: dict[str, Any],
) -> Path:
    """Write ``out/results.json`` and ``out/samples_<task>.jsonl`` (replacing older ones); returns the results path.

    ``records`` are the scored prediction records in input order, ``samples`` and ``doc_ids`` (positions in
    the task's input) theirs; ``metrics`` is :func:`flexattn_jax.app.eval.tasks.task_metrics`' output.
    """
    out = Path(out)
    name = task_name(task, records)
    rows = select_rows(cfg, protocol)
    result = aggregate(task, name, records, metrics)
    result.update(protocol=protocol, select_rows=rows)
    metric_names = sorted({k.split(",")[0] for k in result if k.endswith(",none") and "_stderr" not in k})
    generates = not (task == "vstar" and protocol == "likelihood")
    task_config = {
        "task": name, "output_type": "generate_until" if generates else "loglikelihood", "protocol": protocol,
        "select_rows": rows, "hr_budget": settings.get("hr_budget"), "hr_budget_tokens": metrics.get("hr_budget_tokens"),
        "metric_list": [{"metric": m, "higher_is_better": True} for m in metric_names],
        "metadata": {"version": TASK_VERSION},
    }
    if generates:
        task_config["generation_kwargs"] = {"max_new_tokens": settings.get("max_new_tokens"), "temperature": 0, "do_sample": False}
    if task == "textvqa":
        task_config["ocr_tokens"] = bool(settings.get("ocr_tokens"))
    results = {
        "results": {name: result},
        "group_subtasks": {name: []},
        "configs": {name: task_config},
        "versions": {name: TASK_VERSION},
        "n-shot": {name: 0},
        "higher_is_better": {name: dict.fromkeys(metric_names, True)},
        "n-samples": {name: {"original": metrics["items"], "effective": metrics["scored"]}},
        "config": {
            "model": "flexattn-jax", "model_args": f"pretrained={settings.get('checkpoint', '')}",
            "batch_size": settings.get("batch_size"), "limit": settings.get("limit"), "dtype": cfg.dtype,
            "overrides": settings.get("overrides", []),
        },
        "flexattn_jax_version": _version("flexattn-jax"), "jax_version": _version("jax"),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y%m%d_%H%M%S"),
    }
    lines = [json.dumps(sample_line(task, name, d, r, s, protocol), ensure_ascii=False) + "\n"
             for r, s, d in zip(records, samples, doc_ids, strict=True)]
    _atomic_write(out / f"samples_{name}.jsonl", "".join(lines))
    path = out / RESULTS
    _atomic_write(path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
