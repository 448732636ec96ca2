"""bench/hr_init.py's reading of the loss curves (the training itself is the demo's, tested there)."""

import numpy as np

from bench.hr_init import smoothed, steps_to, table


def test_smoothed_is_a_trailing_mean_and_steps_to_the_first_hit():
    losses = [4.0, 2.0, 0.0, 1.0, 0.5]
    np.testing.assert_allclose(smoothed(losses, 2), [4.0, 3.0, 1.0, 0.5, 0.75])
    np.testing.assert_allclose(smoothed(losses, 10), np.cumsum(losses) / np.arange(1, 6))
    curve = smoothed(losses, 2)
    assert steps_to(curve, 1.0) == 3 and steps_to(curve, 3.0) == 2 and steps_to(curve, 0.1) is None


def test_table_reads_steps_per_init():
    row = {"seed": 0, "copy": {"steps_to": {"0.5": 10, "0.2": None}, "smoothed_at": {"3": 0.4}, "losses": [1, 1, 1]},
           "random": {"steps_to": {"0.5": 25, "0.2": None}, "smoothed_at": {"3": 0.6}, "losses": [1, 1, 1]}}
    lines = table({"targets": [0.5, 0.2], "seeds": [row]}).splitlines()
    assert lines[0].split() == ["seed", "target", "copy", "random"]
    assert lines[1].split() == ["0", "0.50", "10", "25"] and lines[2].split() == ["0", "0.20", "-", "-"]
    assert lines[3].endswith("copy 0.4000, random 0.6000")
