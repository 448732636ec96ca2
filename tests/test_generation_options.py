"""GenerationOptions: the one declaration of the generation options, its checks and the flags derived from it."""

from __future__ import annotations

import dataclasses

import pytest

from flexattn_jax.app.inference import GenerationOptions, generation_args
from flexattn_jax.settings import SettingError, SettingsArgs, field_docs

BAD = [  # (field, value, the message after the name)
    ("max_new_tokens", 0, " 0 must be at least 1"),
    ("batch_size", 0, " 0 must be at least 1"),
    ("workers", 0, " 0 must be at least 1"),
    ("temperature", -1.0, " -1.0: use a finite value >= 0 (0 = greedy)"),
    ("temperature", float("nan"), " nan: use a finite value >= 0 (0 = greedy)"),
    ("top_p", 0.0, " 0.0: use a nucleus mass in (0, 1]"),
    ("top_p", 1.5, " 1.5: use a nucleus mass in (0, 1]"),
    ("seed", 2**63, f" {2**63} must be a 64-bit integer (from -2**63 to 2**63 - 1)"),
    ("hr_strategy", "nope", " 'nope': use one of 'project', 'cache', 'incremental'"),
    ("hr_budget", "abc", " 'abc': use a count (e.g. 64), a fraction in (0, 1] (e.g. 0.25), 'all', 'adaptive'"),
    ("hr_budget", "1.5", " '1.5': use a count >= 1, a fraction in (0, 1], 'all' or 'adaptive'"),
    ("window", 4, " 4 must be at least batch_size (8)"),
    ("buckets", (), " (): use one or more positive prompt lengths"),
]


@pytest.mark.parametrize("name, value, rest", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_a_bad_value_is_one_line_naming_the_field(name, value, rest):
    with pytest.raises(SettingError) as e:
        GenerationOptions(**{name: value})
    assert str(e.value) == name + rest
    assert "\n" not in str(e.value)


def test_flags_name_the_flag_not_the_field():
    """The same checks through the generated flags: the message spells what the user typed (serve's --max-batch too)."""
    from flexattn_jax.app.generate_cli import generate_options_args, generate_parser
    from flexattn_jax.app.serve import SERVE_OPTIONS, serve_parser

    base = ["--checkpoint", "c", "--batch", "b.jsonl"]
    cases = [(["--top-p", "0"], "--top-p 0.0: use a nucleus mass in (0, 1]"),
             (["--window", "4"], "--window 4 must be at least --batch-size (8)"),
             (["--hr-budget", "abc"], "--hr-budget 'abc': use a count"),
             (["--seed", str(2**63)], f"--seed {2**63} must be a 64-bit integer")]
    for argv, message in cases:
        with pytest.raises(ValueError) as e:
            generate_options_args().build(generate_parser().parse_args([*base, *argv]))
        assert str(e.value).startswith(message), str(e.value)
    with pytest.raises(ValueError, match=r"^--max-batch 0 must be at least 1$"):
        SERVE_OPTIONS.build(serve_parser().parse_args(["--checkpoint", "c", "--max-batch", "0"]))


def test_each_command_takes_its_flags_from_the_fields():
    """generate, serve and eval: one flag per field they expose, its help the field's docstring, its default the field's."""
    from flexattn_jax.app.eval.cli import EVAL_OPTIONS, eval_parser
    from flexattn_jax.app.generate_cli import generate_options_args, generate_parser
    from flexattn_jax.app.serve import SERVE_OPTIONS, serve_parser

    docs = field_docs(GenerationOptions)
    assert set(docs) == {f.name for f in dataclasses.fields(GenerationOptions)}  # every field documented
    for spec, parser, argv in ((generate_options_args(), generate_parser(), ["--checkpoint", "c", "--batch", "b"]),
                               (SERVE_OPTIONS, serve_parser(), ["--checkpoint", "c"]),
                               (EVAL_OPTIONS, eval_parser(), ["vqa", "--checkpoint", "c", "--data", "d"])):
        actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
        for name, *_ in spec.fields():
            action = actions[spec.flag(name)]
            assert action.help.startswith(docs[name]), (spec.flag(name), action.help)
        built = spec.build(parser.parse_args(argv), max_new_tokens=64)
        assert built == GenerationOptions()  # the flags' defaults are the dataclass's
    assert SERVE_OPTIONS.build(serve_parser().parse_args(["--checkpoint", "c", "--max-batch", "3", "--workers", "2"])) \
        == GenerationOptions(batch_size=3, workers=2)
    g = generate_options_args().build(generate_parser().parse_args(
        ["--checkpoint", "c", "--batch", "b", "--temperature", "0.5", "--top-p", "0.9", "--seed", "7", "--hr-strategy", "cache",
         "--hr-budget", "0.25", "--window", "16", "--max-new-tokens", "3"]))
    assert g == GenerationOptions(max_new_tokens=3, temperature=0.5, top_p=0.9, seed=7, hr_strategy="cache", hr_budget="0.25",
                                  window=16)


def test_options_by_keyword_and_unknown_ones():
    """``answer`` / ``stream_answers`` take the dataclass or its fields by keyword; an unknown keyword is named."""
    base = GenerationOptions(batch_size=4)
    assert GenerationOptions.of(base, max_new_tokens=3) == GenerationOptions(batch_size=4, max_new_tokens=3)
    assert GenerationOptions.of(None) == GenerationOptions()
    with pytest.raises(TypeError, match="unknown generation option 'max_tokens'"):
        GenerationOptions.of(base, max_tokens=3)
    with pytest.raises(TypeError, match="has no field 'nope'"):
        SettingsArgs(GenerationOptions, only=("nope",)).fields()
    with pytest.raises(SettingError, match="^top_p 2: use a nucleus mass"):
        GenerationOptions.of(base, top_p=2)


def test_hr_budget_applies_to_the_model_config():
    from tests.fixtures import tiny_config

    cfg = tiny_config()
    assert GenerationOptions().model_config(cfg) is cfg
    assert GenerationOptions(hr_budget="0.25").model_config(cfg).flex.hr_budget == 0.25
    assert GenerationOptions(hr_budget="3").model_config(cfg).flex.hr_budget == 3
    assert GenerationOptions(hr_budget="all").model_config(cfg).flex.hr_budget is None


def test_answer_settings_follow_sampling():
    """An answers file's header: greedy answers do not depend on the seed or the batching, sampled ones do."""
    greedy = GenerationOptions(seed=1, batch_size=2).answer_settings()
    assert greedy == {"max_new_tokens": 64, "temperature": 0.0, "hr_budget": None, "hr_strategy": "project"}
    sampled = GenerationOptions(temperature=0.7, seed=1, batch_size=2).answer_settings()
    assert (sampled["seed"], sampled["batch_size"], sampled["top_p"], sampled["window"]) == (1, 2, 1.0, None)


def test_generation_args_shows_its_defaults():
    import argparse

    p = argparse.ArgumentParser()
    generation_args(("window", "hr_budget")).add(p)
    helps = {a.option_strings[0]: a.help for a in p._actions if a.option_strings}
    assert helps["--window"].endswith("(default: max(4 x batch size, 32))")
    assert helps["--hr-budget"].endswith("(default: the checkpoint's, 'all')")
