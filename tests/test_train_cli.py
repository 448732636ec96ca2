"""The train CLI: help, every TrainConfig / DataConfig field reachable by a flag, clean errors."""

import dataclasses

import numpy as np
import pytest

from tests.fixtures import tiny_config, write_llava_dataset
from train.cli import apply_recipe, build_parser, data_config_from_args, main, train_config_from_args
from train.config import DataConfig, TrainConfig


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("--checkpoint CONVERTED", "--mesh", "--grad-accum", "--set KEY=VALUE", "recipe", "Exit status"):
        assert text in out


def test_every_config_field_has_a_flag():
    argv = [
        "--data", "d.json", "--images", "imgs", "--tokenizer", "tok", "--max-len", "99", "--max-select-rows", "7",
        "--buckets", "32,99", "--no-group-by-length", "--group-size", "3", "--no-shuffle", "--data-seed", "9", "--workers", "3",
        "--threads", "5", "--prefetch", "6", "--on-error", "raise", "--truncation", "truncate", "--add-image-tag",
        "--system-prompt", "llava_v1", "--max-logged-errors", "1",
        "--steps", "11", "--stop-at", "5", "--epochs", "2", "--batch-size", "16", "--grad-accum", "2", "--lr", "1e-3",
        "--warmup-ratio", "0.1", "--warmup-steps", "4", "--end-lr-ratio", "0.1", "--weight-decay", "0.1", "--adam-b1", "0.8",
        "--adam-b2", "0.9", "--adam-eps", "1e-6", "--clip-norm", "0.5", "--trainable", "hr", "--seed", "1", "--no-nan-check",
        "--log-every", "2", "--save-every", "3", "--keep", "1", "--no-async-save", "--no-save-final", "--peak-tflops", "1.5",
        "--no-progress", "--no-tensorboard", "--grounding-weight", "0.5",
        "--lora", "--lora-rank", "8", "--lora-alpha", "4", "--lora-dropout", "0.1", "--lora-targets", "^text/layers/attn/q$",
        "--base-quant", "int8",
    ]
    a = build_parser().parse_args(argv)
    tc, dc = train_config_from_args(a), data_config_from_args(a, a.tokenizer)
    for cfg, default in ((tc, TrainConfig()), (dc, DataConfig())):
        same = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) == getattr(default, f.name)]
        assert same == [], same
    d = build_parser().parse_args([])
    assert train_config_from_args(d) == TrainConfig()  # CLI defaults are the recipe's


def test_recipe_and_errors(tmp_path, capsys):
    cfg = apply_recipe(tiny_config(), "release")
    assert cfg.flex.enabled and cfg.flex.highres_size == 84 and cfg.flex.threshold == 48 and cfg.flex.warmup == 10
    cfg_json = tmp_path / "tiny.json"
    cfg_json.write_text(tiny_config().to_json())
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    assert main(["--init", "random", "--config-json", str(cfg_json), "--data", str(bad), "--mesh", "data=1",
                 "--no-progress"]) == 2
    assert "malformed JSON at line 1" in capsys.readouterr().err
    assert main(["--init", "random", "--config-json", str(cfg_json)]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(["--init", "random", "--config-json", str(cfg_json), "--data", str(bad), "--set", "nope=1"]) == 2
    assert "unknown config field 'nope'" in capsys.readouterr().err


def test_train_from_converted_llava_gets_hr_kernels(tmp_path, capsys):
    """A converted plain LLaVA checkpoint + --recipe release: FlexAttention on, new *_hr kernels (copies of k/v by
    default), one step."""
    import json

    import numpy as np

    from tests.checkpoints import write_tiny_checkpoint
    from train.checkpoint import Checkpointer

    plain = dataclasses.replace(tiny_config(), flex=dataclasses.replace(tiny_config().flex, enabled=False))
    ckpt = write_tiny_checkpoint(tmp_path / "converted", plain, seed=4, std=0.02)
    write_llava_dataset(tmp_path / "data", seed=0, n=8, hr_size=84, obj_px=6)
    out = tmp_path / "run"
    argv = ["--checkpoint", str(ckpt), "--data", str(tmp_path / "data" / "data.json"), "--images", str(tmp_path / "data"),
            "--max-len", "64", "--batch-size", "8", "--steps", "30", "--stop-at", "1", "--lr", "1e-2", "--adam-eps", "1e-3",
            "--warmup-steps", "0", "--mesh", "data=8", "--out", str(out), "--no-progress", "--no-tensorboard"]
    assert main(argv) == 0
    assert "initialised 2 FlexAttention kernels as copies of k/v (--hr-init copy)" in capsys.readouterr().out
    with Checkpointer(out / "checkpoints") as ck:
        meta = ck.read_meta()
    assert meta["recipe"] == "release" and meta["model_config"]["flex"]["enabled"]
    assert meta["model_config"]["flex"]["threshold"] == 48 and meta["model_config"]["flex"]["highres_size"] == 84
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 1 and np.isfinite(rec["loss"])


@pytest.mark.slow
def test_lora_run_resumes_with_the_base_reloaded(tmp_path, capsys):
    """--lora: a run stopped after step 1 resumes (its checkpoint holds the adapters and the projector only) and merges."""
    import json

    from convert.cli import main as convert_main
    from flexattn_jax.checkpoint import load_converted
    from tests.checkpoints import write_tiny_checkpoint
    from train.checkpoint import Checkpointer

    ckpt = write_tiny_checkpoint(tmp_path / "converted", seed=4, std=0.02)
    write_llava_dataset(tmp_path / "data", seed=0, n=8, hr_size=84, obj_px=6)
    out = tmp_path / "run"
    argv = ["--checkpoint", str(ckpt), "--recipe", "none", "--data", str(tmp_path / "data" / "data.json"), "--images",
            str(tmp_path / "data"), "--max-len", "64", "--batch-size", "8", "--steps", "2", "--lr", "1e-2", "--warmup-steps", "0",
            "--mesh", "data=1", "--out", str(out), "--no-progress", "--no-tensorboard", "--lora", "--lora-rank", "4"]
    assert main([*argv, "--stop-at", "1"]) == 0
    with Checkpointer(out / "checkpoints") as ck:
        names = [k for k in ck.stored_shapes(1) if k.startswith("params/")]
    assert names and all("lora_" in k or k.startswith("params/projector/") for k in names)
    assert main(argv) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert convert_main(["merge-lora", "--base", str(ckpt), "--lora", str(out), str(tmp_path / "merged")]) == 0
    merged, _ = load_converted(tmp_path / "merged")
    base, _ = load_converted(ckpt)
    assert not np.array_equal(np.asarray(merged["text"]["layers"]["attn"]["q"]["kernel"]),
                              np.asarray(base["text"]["layers"]["attn"]["q"]["kernel"]))
