"""``flexattn-jax eval``: the FlexAttention paper's benchmarks in their protocols (app layer).

- :mod:`~flexattn_jax.app.eval.data`: readers for V* Bench, MagnifierBench, TextVQA (official JSON or
  LLaVA's OCR JSONL) and generic VQA JSONL, as their authors ship them.
- :mod:`~flexattn_jax.app.eval.tasks`: prompts, per-item scores and metrics of each protocol.
- :mod:`~flexattn_jax.app.eval.answers`: VQA answer normalisation and soft accuracy, POPE yes/no,
  the release's MagnifierBench letter parser.
- :mod:`~flexattn_jax.app.eval.likelihood`: option likelihood (V* release protocol) in packed, jitted forwards.
- :mod:`~flexattn_jax.app.eval.runner`: streamed, resumable predictions and metrics for one run.
- :mod:`~flexattn_jax.app.eval.sweep`: accuracy against TFLOPs per item over HR budgets (table, plot).
- :mod:`~flexattn_jax.app.eval.cli`: the command.
"""
