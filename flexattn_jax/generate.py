"""Jitted batched generation: prefill + decode steps over an explicit KV cache pytree.

The release's semantics (spec, "Generation with a KV cache"): at prefill the last prompt row is
the select row; at each decode step the new token is the only row, hence the select row, in
every layer: the first selection layer computes the mask from the new token's attention over the
cached image columns, and the hierarchical layers attend to the cached keys plus the selected HR
keys. Two HR K/V strategies (static):

* ``'project'``: project the K selected HR tokens at every step (the release's way; cheap prefill,
  O(K D Hkv d) per hierarchical layer per step);
* ``'cache'``: project all M HR tokens once at prefill per hierarchical layer, gather K per step
  (O(M D Hkv d) once, then no projection; memory Lh x M x Hkv x d x 2 per sample);
* ``'incremental'``: a per-layer cache of projected HR K/V filled as tokens get selected: the prefill
  projects the K selected tokens (as 'project'), each decode step only the tokens selected for the
  first time, at most ``cfg.hr_step_tokens`` (``flex.hr_step_cells`` pooled cells) on the fast path,
  with an exact ``lax.cond`` fallback to all K when more are new (memory as 'cache').

All give the same tokens: the projections are linear, only where they happen differs.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from flexattn_jax import hierarchical as H
from flexattn_jax import text as T
from flexattn_jax.config import ModelConfig
from flexattn_jax.model import (
    HRContext,
    KVCache,
    default_select_rows,
    embed_inputs,
    embed_tokens,
    logits_from_hidden,
    positions_from_mask,
    run_decoder,
)

HRStrategy = Literal["project", "cache", "incremental"]


class DecodeState(NamedTuple):
    """Everything a decode step needs, as one pytree (donate it between steps)."""

    cache: KVCache
    hr: HRContext | None
    hr_kv: H.HRKV | None  # (Lh, B, M, Hkv, d) projected HR K/V: strategies 'cache' and 'incremental'
    next_position: Int[Array, " B"]


class StepMaps(NamedTuple):
    """Per layer, the select row's heads-summed attention over the LR image and its HR mask."""

    image_attention: Float[Array, "L B G"]
    hr_masks: Bool[Array, "L B M"]


def empty_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    t = cfg.text
    shape = (t.num_layers, batch, max_len, t.num_kv_heads, t.head_dim)
    dt = jnp.dtype(cfg.dtype)
    return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch, max_len), bool), jnp.int32(0))


def project_all_hr(text_params: dict, cfg: ModelConfig, hr: HRContext) -> H.HRKV:
    """Every hierarchical layer's HR keys (image RoPE applied) and values for all M tokens (a loop over the
    layers: ``lax.map``, or unrolled when ``cfg.scan_layers`` is off)."""
    first = cfg.flex.first_select_layer + 1
    layers = jax.tree.map(lambda a: a[first:], text_params["layers"]["attn"])
    attn = T.AttentionWeights(cfg)

    def one(p):
        return attn.apply({"params": p}, hr.features, hr.cos, hr.sin, method=T.AttentionWeights.hr_kv)

    if cfg.scan_layers:
        k, v = jax.lax.map(one, layers)
    else:  # unrolled like the decoder's layers (and so counted per layer by XLA's cost analysis)
        n = jax.tree.leaves(layers)[0].shape[0]
        outs = [one(jax.tree.map(lambda a, i=i: a[i], layers)) for i in range(n)]
        k, v = (jnp.stack(xs) for xs in zip(*outs, strict=True))
    return H.HRKV(k, v, None)


def empty_hr_cache(cfg: ModelConfig, batch: int) -> H.HRKV:
    """The incremental strategy's cache before any token is projected."""
    t = cfg.text
    lh = t.num_layers - cfg.flex.first_select_layer - 1
    shape = (lh, batch, cfg.num_hr_tokens, t.num_kv_heads, t.head_dim)
    dt = jnp.dtype(cfg.dtype)
    return H.HRKV(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros(shape[:3], bool))


def _initial_hr_kv(params: dict, cfg: ModelConfig, hr: HRContext | None, strategy: HRStrategy, batch: int) -> H.HRKV | None:
    if hr is None or strategy == "project":
        return None
    if strategy == "cache":
        return project_all_hr(params["text"], cfg, hr)
    if strategy == "incremental":
        return empty_hr_cache(cfg, batch)
    raise ValueError(f"hr_strategy={strategy!r}: use 'project', 'cache' or 'incremental'")


def _maps(out) -> StepMaps | None:
    if out.image_attention is None:
        return None
    return StepMaps(out.image_attention[:, :, -1], out.hr_masks[:, :, -1])  # the last row: the one being predicted


def prefill(
    params: dict,
    cfg: ModelConfig,
    input_ids: Int[Array, "B T"],
    pixel_values: Float[Array, "B H W C"] | None,
    attention_mask: Bool[Array, "B T"],
    margin: Int[Array, "B 2"] | None = None,
    *,
    max_len: int,
    hr_strategy: HRStrategy = "project",
    rng: jax.Array | None = None,
) -> tuple[DecodeState, Float[Array, "B V"], StepMaps | None]:
    """Run the (left-padded) prompt, fill the cache; return the state and the last row's logits."""
    attention_mask = attention_mask.astype(bool)
    positions = positions_from_mask(attention_mask)
    x, hr = embed_inputs(params, cfg, input_ids, pixel_values, positions, margin)
    return prefill_embedded(params, cfg, x, hr, attention_mask, positions, max_len=max_len, hr_strategy=hr_strategy, rng=rng)


def prefill_embedded(
    params: dict,
    cfg: ModelConfig,
    x: Float[Array, "B T D"],
    hr: HRContext | None,
    attention_mask: Bool[Array, "B T"],
    positions: Int[Array, "B T"],
    *,
    max_len: int,
    hr_strategy: HRStrategy = "project",
    rng: jax.Array | None = None,
) -> tuple[DecodeState, Float[Array, "B V"], StepMaps | None]:
    """:func:`prefill` from the embedded prompt (image features merged in) and its HR context."""
    b, t = attention_mask.shape
    cache = empty_cache(cfg, b, max_len)
    cache = cache._replace(valid=cache.valid.at[:, :t].set(attention_mask))
    hr_kv = _initial_hr_kv(params, cfg, hr, hr_strategy, b)
    rows, valid = default_select_rows(cfg, attention_mask) if hr is not None else (None, None)
    out = run_decoder(
        params["text"], cfg, x, positions, cache.valid, cache=cache, hr=hr, hr_kv=hr_kv,
        select_rows=rows, select_valid=valid, rng=rng, collect_maps=hr is not None, cache_start=0,  # a fresh cache
    )
    logits = logits_from_hidden(params["text"], cfg, out.x[:, -1:])[:, 0]
    state = DecodeState(out.cache, hr, out.hr_kv, positions[:, -1] + 1)
    return state, logits, _maps(out)


def decode_step(
    params: dict, cfg: ModelConfig, state: DecodeState, token: Int[Array, " B"], rng: jax.Array | None = None
) -> tuple[DecodeState, Float[Array, "B V"], StepMaps | None]:
    """One token per sample: it is the select row of every layer (per-step HR selection)."""
    b = token.shape[0]
    cache = state.cache
    x = embed_tokens(params["text"], cfg, token[:, None])
    valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones((b, 1), bool), (0, cache.index))
    cache = cache._replace(valid=valid)
    rows = jnp.zeros((b, 1), jnp.int32)
    out = run_decoder(
        params["text"], cfg, x, state.next_position[:, None], valid, cache=cache, hr=state.hr, hr_kv=state.hr_kv,
        select_rows=rows if state.hr is not None else None, select_valid=jnp.ones((b, 1), bool), rng=rng,
        collect_maps=state.hr is not None,
    )
    logits = logits_from_hidden(params["text"], cfg, out.x)[:, 0]
    return state._replace(cache=out.cache, hr_kv=out.hr_kv, next_position=state.next_position + 1), logits, _maps(out)


def sample_token(
    logits: Float[Array, "B V"], rng: jax.Array | None, temperature: float, top_p: float
) -> Int[Array, " B"]:
    """Greedy when ``temperature == 0``; otherwise temperature + nucleus (top-p) sampling."""
    if temperature == 0.0 or rng is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        logits = nucleus_filter(logits, jnp.float32(top_p))
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def nucleus_filter(logits: Float[Array, "B V"], top_p: Float[Array, "*B"]) -> Float[Array, "B V"]:
    """``-inf`` outside each row's nucleus: the most probable tokens whose probabilities sum to ``top_p`` (a scalar or
    one per row; the top token is always kept, ``top_p >= 1`` keeps every token)."""
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), logits.shape[:1])[:, None]
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs < top_p) | (top_p >= 1.0)  # always keeps the top token
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def selection_rng(rng: jax.Array | None) -> jax.Array:
    """The key of the random-selection ablation's masks: derived from the sampling key (default key 0); decode step
    ``i`` (the one predicting token ``i``) folds in ``i``."""
    return jax.random.fold_in(rng if rng is not None else jax.random.key(0), 1 << 20)


class GenerateOutput(NamedTuple):
    tokens: Int[Array, "B N"]  # generated ids; ``pad_token_id`` after EOS
    lengths: Int[Array, " B"]  # tokens generated per sample, EOS included
    step_logits: Float[Array, "N B V"] | None
    prefill_maps: StepMaps | None
    step_maps: StepMaps | None  # stacked over steps: (N, L, B, ...)
    steps: Int[Array, ""] | None = None  # decode steps run (< N - 1 when every row stopped early)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_new_tokens", "max_len", "temperature", "top_p", "hr_strategy", "return_logits", "return_step_maps",
                     "early_stop"),
)
def generate(
    params: dict,
    cfg: ModelConfig,
    input_ids: Int[Array, "B T"],
    pixel_values: Float[Array, "B H W C"] | None,
    attention_mask: Bool[Array, "B T"],
    margin: Int[Array, "B 2"] | None = None,
    rng: jax.Array | None = None,
    *,
    max_new_tokens: int,
    max_len: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    hr_strategy: HRStrategy = "project",
    return_logits: bool = False,
    return_step_maps: bool = False,
    early_stop: bool = True,
) -> GenerateOutput:
    """Prefill, then up to ``max_new_tokens - 1`` decode steps in a ``lax.while_loop``; rows stop at EOS.

    Token ``i`` is sampled from the logits of decode step ``i`` (step 0 = the prefill); the loop
    ends as soon as every row has emitted EOS (``early_stop``), so short answers cost few steps;
    the tokens are those of running all steps (finished rows only emit ``pad_token_id``).
    ``return_logits`` / ``return_step_maps`` (per-step debugging outputs) run every step, as does
    ``early_stop=False``. One compile per (batch, prompt bucket, ``max_new_tokens``) and static options.
    """
    b, t = input_ids.shape
    n = max_new_tokens
    max_len = max_len or t + n
    if max_len < t + n:
        raise ValueError(f"max_len={max_len} < prompt {t} + max_new_tokens {n}")
    sel_rng = None
    if cfg.flex.enabled and cfg.flex.selection == "random":  # the ablation draws its masks from rng (default key 0)
        sel_rng = selection_rng(rng)
    state, logits, maps0 = prefill(
        params, cfg, input_ids, pixel_values, attention_mask, margin, max_len=max_len, hr_strategy=hr_strategy, rng=sel_rng
    )
    keys = jax.random.split(rng, n) if rng is not None else None
    eos, pad = cfg.eos_token_id, cfg.pad_token_id
    stop_early = early_stop and not (return_logits or return_step_maps)

    def sample(i, logits, done):
        tok = sample_token(logits, None if keys is None else keys[i], temperature, top_p)
        tok = jnp.where(done, pad, tok)
        return tok, done | (tok == eos)

    def decode(i, state, tok):
        """Decode step ``i`` (the one after token ``i``): its state, the logits of token ``i + 1``, its maps."""
        step_rng = None if sel_rng is None else jax.random.fold_in(sel_rng, i + 1)
        return decode_step(params, cfg, state, tok, step_rng)

    tok0, done0 = sample(0, logits, jnp.zeros((b,), bool))
    tokens0 = jnp.full((b, n), pad, jnp.int32).at[:, 0].set(tok0)
    step_logits0 = jnp.zeros((n, *logits.shape), logits.dtype).at[0].set(logits) if return_logits else None
    step_maps0 = None
    if return_step_maps and maps0 is not None:
        step_maps0 = jax.tree.map(lambda a: jnp.zeros((n, *a.shape), a.dtype), maps0)

    def cond(carry):
        i, _, _, done, *_ = carry
        more = i < n
        return (more & ~jnp.all(done)) if stop_early else more

    def body(carry):
        i, state, tok, done, tokens, step_logits, step_maps = carry
        state, logits, maps = decode(i - 1, state, tok)
        tok, done = sample(i, logits, done)
        tokens = tokens.at[:, i].set(tok)
        if step_logits is not None:
            step_logits = step_logits.at[i].set(logits)
        if step_maps is not None:
            step_maps = jax.tree.map(lambda buf, m: buf.at[i - 1].set(m), step_maps, maps)
        return i + 1, state, tok, done, tokens, step_logits, step_maps

    carry = (jnp.int32(1), state, tok0, done0, tokens0, step_logits0, step_maps0)
    i, state, tok, _, tokens, step_logits, step_maps = jax.lax.while_loop(cond, body, carry)
    if step_maps is not None:  # the maps of the step after the last token (it runs, as in a scan over all steps)
        maps = decode(n - 1, state, tok)[2]
        step_maps = jax.tree.map(lambda buf, m: buf.at[n - 1].set(m), step_maps, maps)
    lengths = jnp.minimum(jnp.sum(jnp.cumsum(tokens == eos, axis=1) == 0, axis=1) + 1, n)
    return GenerateOutput(tokens, lengths.astype(jnp.int32), step_logits, maps0, step_maps, i - 1)
