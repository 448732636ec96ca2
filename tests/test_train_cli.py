"""The train CLI: help, every TrainConfig / DataConfig field reachable by a flag, clean errors."""

import dataclasses
import logging

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
        "--base-quant", "int8", "--sync-timeout-s", "30",
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


@pytest.mark.slow
def test_train_from_converted_llava_gets_hr_kernels(tmp_path, caplog):
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
    caplog.set_level("INFO", logger="train")
    assert main(argv) == 0
    assert "initialised 2 FlexAttention kernels as copies of k/v (--hr-init copy)" in caplog.text
    with Checkpointer(out / "checkpoints") as ck:
        meta = ck.read_meta()
    assert meta["recipe"] == "release" and meta["model_config"]["flex"]["enabled"]
    assert meta["model_config"]["flex"]["threshold"] == 48 and meta["model_config"]["flex"]["highres_size"] == 84
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 1 and np.isfinite(rec["loss"])


def test_flags_come_from_the_config_dataclasses():
    """Every TrainConfig / DataConfig field has a flag whose help is the field's docstring and whose default is the field's."""
    from flexattn_jax.settings import field_docs
    from train.cli import DATA_ARGS, TRAIN_ARGS

    actions = {a.dest: a for a in build_parser()._actions}
    for spec, cls in ((TRAIN_ARGS, TrainConfig), (DATA_ARGS, DataConfig)):
        docs = field_docs(cls)
        assert all(docs[f.name] for f in dataclasses.fields(cls))  # nested settings (``lora``) too
        leaves = spec.fields()
        assert {n.split(".")[0] for n, *_ in leaves} == {f.name for f in dataclasses.fields(cls)}
        for name, _, default, doc in leaves:
            action = actions[spec.dest(name)]
            assert doc and action.help.startswith(doc), name
            assert spec.flag(name) in action.option_strings
            if name not in spec.defaults:
                assert action.default == default, name
    assert actions["lr"].help == "Peak learning rate. (default: 2e-05)"
    assert "--no-shuffle" in actions["shuffle"].option_strings and actions["on_error"].choices == ("skip", "raise")


def test_set_reaches_train_and_data_settings():
    a = build_parser().parse_args(["--lr", "1e-3", "--set", "train.lr=5e-4", "--set", "data.buckets=16,32",
                                   "--set", "train.clip_norm=none", "--set", "data.on_error=raise", "--set", "dtype=bfloat16"])
    tc, dc = train_config_from_args(a), data_config_from_args(a, None)
    assert tc.lr == 5e-4 and tc.clip_norm is None  # --set wins over the flag
    assert dc.buckets == (16, 32) and dc.on_error == "raise"
    from train.cli import settings_overrides

    assert settings_overrides(a)[0] == ["dtype=bfloat16"]  # the model's override goes to ModelConfig
    for bad, msg in ((["--set", "train.lrr=1"], "unknown train setting 'lrr'"),
                     (["--set", "train.lr=fast"], "train.lr='fast': expected a number"),
                     (["--set", "data.on_error=maybe"], "data.on_error='maybe': use one of 'skip', 'raise'"),
                     (["--set", "train.batch_size=7", "--set", "train.grad_accum=2"], "not a multiple of grad_accum")):
        with pytest.raises(ValueError, match=msg):
            train_config_from_args(b := build_parser().parse_args(bad)) and data_config_from_args(b, None)


def test_old_spellings_and_flag_errors(capsys):
    """The flags' spellings from before they were generated still parse to the same settings; a bad value is a one-line error."""
    a = build_parser().parse_args(["--clip-norm", "0", "--no-shuffle", "--data-seed", "3", "--seed", "1", "--buckets", "8,16",
                                   "--system-prompt", "llava_v1", "--no-group-by-length", "--add-image-tag"])
    tc, dc = train_config_from_args(a), data_config_from_args(a, None)
    assert not tc.clip_norm and dc.seed == 3 and tc.seed == 1 and dc.buckets == (8, 16) and not dc.shuffle
    from flexattn_jax.preprocess import SYSTEM_PROMPT

    assert dc.system_prompt == SYSTEM_PROMPT and not dc.group_by_length and dc.add_image_tag
    assert data_config_from_args(build_parser().parse_args(["--seed", "4"]), None).seed == 4  # --data-seed follows --seed
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--max-len", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--max-len" in err and "many" in err


def test_nested_settings_dataclass_gets_prefixed_flags():
    """A nested settings dataclass (e.g. ``lora: LoraConfig``) gets ``--lora-rank`` style flags, its docstrings as help,
    tuples, Optional, bool and Literal fields; ``--set`` reaches its fields by dotted name."""
    from typing import Literal

    from flexattn_jax.overrides import replace_settings
    from flexattn_jax.settings import SettingsArgs

    @dataclasses.dataclass(frozen=True)
    class Inner:
        rank: int = 8
        """Adapter rank."""
        targets: tuple[str, ...] = ("q", "v")
        """Kernels to adapt."""
        scale: float | None = None
        """Scale (none: 1/rank)."""

    @dataclasses.dataclass(frozen=True)
    class Outer:
        mode: Literal["a", "b"] = "a"
        """Mode."""
        on: bool = False
        """Switch."""
        inner: Inner = dataclasses.field(default_factory=Inner)

    import argparse

    spec = SettingsArgs(Outer)
    p = argparse.ArgumentParser()
    spec.add(p)
    help_text = p.format_help()
    for text in ("--inner-rank N", "Adapter rank. (default: 8)", "--inner-targets A,B,...", "(default: q,v)", "--no-on", "{a,b}"):
        assert text in help_text, text
    assert spec.build(p.parse_args([])) == Outer()
    got = spec.build(p.parse_args(["--inner-rank", "4", "--inner-targets", "q,k,o", "--inner-scale", "0.5", "--on", "--mode", "b"]))
    assert got == Outer(mode="b", on=True, inner=Inner(rank=4, targets=("q", "k", "o"), scale=0.5))
    assert replace_settings(got, [("inner.scale", "none"), ("inner.rank", "2")], "x").inner == Inner(2, ("q", "k", "o"), None)
    with pytest.raises(ValueError, match="unknown x setting 'inner.rnk'"):
        replace_settings(got, [("inner.rnk", "2")], "x")


@pytest.mark.slow
def test_lora_run_resumes_with_the_base_reloaded(tmp_path, caplog):
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
    caplog.set_level(logging.INFO, logger="train")
    assert main(argv) == 0
    assert "resumed from" in caplog.text
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert convert_main(["merge-lora", "--base", str(ckpt), "--lora", str(out), str(tmp_path / "merged")]) == 0
    merged, _ = load_converted(tmp_path / "merged")
    base, _ = load_converted(ckpt)
    assert not np.array_equal(np.asarray(merged["text"]["layers"]["attn"]["q"]["kernel"]),
                              np.asarray(base["text"]["layers"]["attn"]["q"]["kernel"]))
