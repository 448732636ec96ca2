"""The application layer: the ``flexattn-jax`` commands (generate, demo, eval, serve, compile), the
streaming inference pipeline, resumable outputs, the compile cache and the attention overlays.

It sits on top of the library (``flexattn_jax``), ``convert``, ``train`` and ``bench``; nothing below
imports it.
"""
