"""bench/stability.py: new-token counting and the budget table on hand-made selection masks."""

import numpy as np

from bench.stability import budget_table, format_table, new_tokens, summarize
from flexattn_jax.generate import GenerateOutput, StepMaps
from tests.fixtures import tiny_config


def _out(masks: np.ndarray, lengths: list[int]) -> GenerateOutput:
    """masks (S+1, L, B, M): the prefill's per-layer masks, then each decode step's."""
    att = np.zeros(masks.shape[:3] + (4,), np.float32)
    return GenerateOutput(
        tokens=np.zeros((masks.shape[2], masks.shape[0] - 1), np.int32), lengths=np.asarray(lengths, np.int32), step_logits=None,
        prefill_maps=StepMaps(att[0], masks[0]), step_maps=StepMaps(att[1:], masks[1:]),
    )


def test_counts_first_time_selections_per_hierarchical_layer():
    cfg = tiny_config()  # 3 layers, selection at layer 1: one hierarchical layer (2), fed by layer 1's mask
    m = cfg.num_hr_tokens
    masks = np.zeros((4, 3, 2, m), bool)
    masks[0, 1, :, :4] = True  # prefill: tokens 0-3 for both samples
    masks[1, 1, 0, :6] = True  # step 1: sample 0 adds 4, 5
    masks[1, 1, 1, :4] = True  # sample 1: nothing new
    masks[2, 1, 0, 10:30] = True  # step 2: sample 0 adds 20 (sample 1 has stopped: not counted)
    masks[3, 1, 0, 2:6] = True  # step 3: nothing new for sample 0
    masks[:, 2] = True  # the last layer's own mask feeds no layer: ignored
    counts, live = new_tokens(_out(masks, [4, 2]), cfg)
    assert counts.shape == (3, 1, 2)
    assert counts[:, 0, 0].tolist() == [2, 20, 0] and counts[0, 0, 1] == 0
    assert live.tolist() == [[True, True], [True, False], [True, False]]
    rows = {r["cells"]: r for r in budget_table(counts, live, cfg, batch=2)}
    k, cell = cfg.hr_budget_tokens, cfg.hr_cell_tokens
    fast1 = min(k, cell)
    over1 = [n > fast1 for n in (2, 20, 0, 0)]  # live sample-steps: (s1, b0) (s2, b0) (s3, b0) (s1, b1)
    assert rows[1]["fallback_rate_b1"] == sum(over1) / 4
    assert rows[0]["fallback_rate_b1"] == 0.5 and rows[0]["projected_per_step_b1"] == 0.5 * k
    assert rows[0]["fallback_rate_batch"] == 2 / 3  # steps 1 and 2 of the batch need more than 0
    s = summarize(counts, live, cfg)
    assert s["layer_steps"] == 4 and s["zero_new_share"] == 0.5 and s["mean_new_tokens"] == 22 / 4
    assert format_table([{"source": "x", "budgets": list(rows.values())}]).count("\n") == len(rows)
