"""``flexattn-jax demo``: the whole inference path on a built-in synthetic high-resolution task.

No weights can be downloaded, so the demo builds a tiny LLaVA-FlexAttn (random init) and the
synthetic "what pattern is the small square?" task (:mod:`flexattn_jax.demo_data`), then runs the
project's batched jitted generation in three modes (FlexAttention, LR only, random selection),
writes ``attention.png`` (last-token attention map and selected HR regions over the images) and
``report.json`` (accuracies, FLOPs per sample from XLA's cost analysis, times).

Training the tiny model with the project's sharded train step is the next step of this demo
(issue 9); until it lands, the model is untrained and the accuracies are chance-level by design.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flexattn_jax.config import FlexConfig, ModelConfig, TextConfig, VisionConfig
from flexattn_jax.demo_data import CLASSES, make_split
from flexattn_jax.inference import Request, answer
from flexattn_jax.params import init_params
from flexattn_jax.tokenizer import IMAGE_ID, build_tokenizer


def tiny_config(vocab_size: int) -> ModelConfig:
    """A CLIP (56 px, 14 px patches) + 4-layer Llama small enough for 2 CPU cores."""
    return ModelConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=56, patch_size=14),
        text=TextConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
            max_position_embeddings=512,
        ),
        flex=FlexConfig(enabled=True, zoom_ratio=3, lowres_size=56, highres_size=168, first_select_layer=1, threshold=64.0),
        image_token_id=IMAGE_ID,
        pad_token_id=3,
        eos_token_id=2,
    )


def _flops_per_sample(params, cfg: ModelConfig, ids_len: int) -> float:
    """XLA cost analysis of one prefill at this config (unrolled layers, abstract shapes)."""
    from flexattn_jax.model import forward

    c = dataclasses.replace(cfg, scan_layers=False)
    args = (
        jax.ShapeDtypeStruct((1, ids_len), jnp.int32),
        jax.ShapeDtypeStruct((1, c.image_size, c.image_size, 3), jnp.float32),
    )
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    compiled = jax.jit(lambda p, i, x: forward(p, c, i, x).logits).lower(abstract, *args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def _save_attention_png(path: Path, items, answers, cfg: ModelConfig, n: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(items))
    fig, axes = plt.subplots(2, n, figsize=(3 * n, 6), squeeze=False)
    g, hr = cfg.lr_grid, cfg.hr_grid
    layer = cfg.text.num_layers - 2  # the mask used by the last hierarchical layer
    for j in range(n):
        img, question, truth, _ = items[j]
        ans = answers[j]
        size = img.size[0]
        axes[0, j].imshow(img)
        if ans.image_attention is not None:
            amap = ans.image_attention[layer].reshape(g, g)
            axes[0, j].imshow(amap, cmap="magma", alpha=0.55, extent=(0, size, size, 0))
        axes[0, j].set_title(f"map, layer {layer}\ntruth: {truth}", fontsize=8)
        axes[1, j].imshow(img)
        if ans.hr_masks is not None:
            mask = ans.hr_masks[layer].reshape(hr, hr).astype(float)
            axes[1, j].imshow(np.ma.masked_where(mask == 0, mask), cmap="cool", alpha=0.45, extent=(0, size, size, 0))
        axes[1, j].set_title(f"selected HR tokens\nanswer: {ans.text!r}", fontsize=8)
        for ax in axes[:, j]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(out_dir: str | Path = "demo_out", seed: int = 0, n_test: int = 32, quick: bool = False, progress: bool = True) -> dict:
    """Build, evaluate in three modes, write ``attention.png`` and ``report.json``; return the report."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    cfg = tiny_config(len(tokenizer))
    params = init_params(cfg, jax.random.key(seed))
    n_test = 8 if quick else n_test
    items = make_split(seed + 1, n_test, hr_size=cfg.image_size)
    requests = [Request(img, question) for img, question, _, _ in items]
    modes = {
        "flexattention": cfg,
        "lr-only": dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, threshold=256.0)),
        "random-selection": dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, selection="random")),
    }
    report: dict = {"trained": False, "classes": list(CLASSES), "n_test": n_test, "modes": {}}
    flex_answers = None
    for name, mode_cfg in modes.items():
        stats: dict = {}
        answers = answer(params, mode_cfg, tokenizer, requests, batch_size=8, max_new_tokens=3, progress=progress, stats=stats)
        correct = sum(a.text is not None and a.text.split()[:1] == [truth] for a, (_, _, truth, _) in zip(answers, items, strict=False))
        report["modes"][name] = {"accuracy": correct / len(items), "seconds": stats["seconds"], "tokens_per_s": stats["tokens_per_s"]}
        if name == "flexattention":
            flex_answers = answers
    ids_len = len(tokenizer("x")["input_ids"]) + cfg.num_image_tokens + 64
    report["flops_per_sample_prefill"] = _flops_per_sample(params, cfg, ids_len)
    _save_attention_png(out / "attention.png", items, flex_answers, cfg)
    report["seconds_total"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'mode':<18} {'accuracy':>8} {'tokens/s':>9}")
    for name, row in report["modes"].items():
        print(f"{name:<18} {row['accuracy']:>8.3f} {row['tokens_per_s']:>9.1f}")
    print(f"(untrained model: chance is {1 / len(CLASSES):.2f})  wrote {out / 'attention.png'} and {out / 'report.json'}")
    return report


def build_parser(prog: str = "flexattn-jax demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default: 0)")
    p.add_argument("--n-test", type=int, default=32, help="held-out images to answer (default: 32)")
    p.add_argument("--quick", action="store_true", help="smaller budget (8 images)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args.out, seed=args.seed, n_test=args.n_test, quick=args.quick)
    return 0
