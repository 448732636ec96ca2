"""The one registry of model presets and the release recipe (flexattn_jax.presets)."""

import pytest

from flexattn_jax import presets
from flexattn_jax.app import aot
from flexattn_jax.config import validate
from train.cli import apply_recipe


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_builds_a_valid_config(name):
    cfg = presets.preset(name, **({"vocab_size": 300} if name == "demo" else {}))
    validate(cfg)
    assert cfg.flex.enabled == ("1.5" not in name)


def test_the_release_recipe_is_one_definition():
    """train --recipe release on LLaVA-1.5 gives the FlexAttention release's preset, which compile loads."""
    recipe = apply_recipe(presets.preset("llava-1.5-7b"), "release").flex
    release = aot.load_model_config("llava-flexattn-7b").flex
    for field in ("enabled", "zoom_ratio", "lowres_size", "highres_size", "threshold", "warmup"):
        assert getattr(recipe, field) == getattr(release, field), field
    assert (release.threshold, release.warmup, release.highres_size) == (48.0, 10.0, 1008)
    assert apply_recipe(presets.preset("llava-1.5-7b"), "none").flex.enabled is False


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="llava-flexattn-7b"):
        presets.preset("llava-9b")
