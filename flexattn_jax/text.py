"""Llama decoder pieces: RMSNorm, rotate-half RoPE (plus the image RoPE of HR keys), the attention
projections (with FlexAttention's ``k_proj_hd``/``v_proj_hd``) and SwiGLU. The decoder layer that
puts them together with the selection and hierarchical attention is :mod:`flexattn_jax.hierarchical`.

HF Llama checkpoints (llava-hf and the original LLaVA-1.5) are rotate-half already: no q/k
permutation anywhere.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from flexattn_jax.config import ModelConfig, TextConfig


def _init(cfg: ModelConfig):
    return nn.initializers.normal(0.02)


class RMSNorm(nn.Module):
    """Llama RMSNorm: statistics in fp32, result cast back, then scaled (as transformers does)."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 / jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


# ---- RoPE -----------------------------------------------------------------------------------

def rope_inv_freq(t: TextConfig, positions: Int[Array, "B T"] | None = None) -> Float[Array, " half"]:
    """Inverse frequencies, with the linear / dynamic-NTK / Llama-3 scaling transformers implements."""
    d = t.head_dim
    base = jnp.float32(t.rope_theta)
    if t.rope_scaling_type == "dynamic" and positions is not None:
        seq_len = jnp.max(positions).astype(jnp.float32) + 1
        orig = jnp.float32(t.max_position_embeddings)
        grown = base * ((t.rope_scaling_factor * seq_len / orig) - (t.rope_scaling_factor - 1)) ** (d / (d - 2))
        base = jnp.where(seq_len > orig, grown, base)
    inv = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if t.rope_scaling_type == "linear":
        inv = inv / t.rope_scaling_factor
    if t.rope_scaling_type == "llama3":  # long wavelengths slowed by the factor, short ones kept, a smooth blend between
        factor, low, high = t.rope_scaling_factor, t.rope_low_freq_factor, t.rope_high_freq_factor
        old = t.rope_original_max_position_embeddings
        wavelen = 2 * np.pi / inv
        scaled = jnp.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv = jnp.where(medium, blended, scaled)
    return inv


def rope_cos_sin(t: TextConfig, positions: Int[Array, "B T"]) -> tuple[Float[Array, "B T d"], Float[Array, "B T d"]]:
    """cos/sin tables (fp32) for the given positions; halves repeated as in rotate-half."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(t, positions)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Float[Array, "*B T H d"], cos: Float[Array, "*B T d"], sin: Float[Array, "*B T d"]) -> jax.Array:
    """Rotate-half RoPE; ``cos``/``sin`` broadcast over heads."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(jnp.float32) * cos[..., None, :] + rotated.astype(jnp.float32) * sin[..., None, :]
    return out.astype(x.dtype)


@functools.cache
def bicubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
    """(size_out, size_in) weights of PyTorch ``interpolate(mode='bicubic', align_corners=False)``.

    PyTorch's kernel: cubic convolution with a = -0.75, source ``(i + 0.5) * in / out - 0.5``, taps
    clamped at the edges, no antialiasing (``jax.image.resize('cubic')`` differs: a = -0.5).
    """

    def cc1(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def cc2(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    scale = size_in / size_out
    w = np.zeros((size_out, size_in), np.float64)
    for i in range(size_out):
        src = (i + 0.5) * scale - 0.5
        x0 = int(np.floor(src))
        t = src - x0
        for tap, weight in zip(range(x0 - 1, x0 + 3), (cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t)), strict=False):
            w[i, min(max(tap, 0), size_in - 1)] += weight
    return w


def image_rope(
    t: TextConfig, image_positions: Int[Array, "B G"], grid: int, hr_grid: int
) -> tuple[Float[Array, "B M d"], Float[Array, "B M d"]]:
    """RoPE for HR keys: the LR image tokens' cos/sin on their g x g grid, bicubic-upsampled."""
    cos, sin = rope_cos_sin(t, image_positions)
    u = jnp.asarray(bicubic_matrix(grid, hr_grid), jnp.float32)

    def up(x):
        b = x.shape[0]
        x = x.reshape(b, grid, grid, -1)
        x = jnp.einsum("ig,jh,bghd->bijd", u, u, x, precision=jax.lax.Precision.HIGHEST)
        return x.reshape(b, hr_grid * hr_grid, -1)

    return up(cos), up(sin)


class Linear(nn.Module):
    """A decoder projection ``y = x W`` (``+ b`` with ``bias``): every decoder linear computes here, in each form its kernel takes.

    The parameters next to ``kernel`` decide the form: plain (``nn.Dense``'s numerics), weight-only quantised
    (``kernel_scale`` present: :mod:`flexattn_jax.quant`, dequantised in the matmul's operand), and LoRA
    (``lora_a``/``lora_b`` present: ``+ dropout(x) A B``, with ``B`` already scaled by ``alpha / r``, see
    :mod:`flexattn_jax.lora`; the dropout of ``cfg.lora_dropout`` applies only under a ``lora_dropout`` rng).
    """

    features: int
    cfg: ModelConfig
    bias: bool = False  # Qwen2's q/k/v (and then the HR k/v): ``+ b`` after the matmul, in every form

    @nn.compact
    def __call__(self, x: Float[Array, "*B i"]) -> Float[Array, "*B o"]:
        c = self.cfg
        dtype = jnp.dtype(c.dtype)
        if self.has_variable("params", "kernel_scale"):
            from flexattn_jax.quant import SCALE_LEAVES, dequantize

            names = ("kernel", *SCALE_LEAVES)
            w = dequantize({n: self.get_variable("params", n) for n in names if self.has_variable("params", n)}, dtype)
        else:
            w = self.param("kernel", _init(c), (x.shape[-1], self.features), jnp.dtype(c.param_dtype))
        x = x.astype(dtype)
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        y = jax.lax.dot_general(x, w.astype(dtype), dims)
        if self.has_variable("params", "lora_a"):
            a, b = self.get_variable("params", "lora_a"), self.get_variable("params", "lora_b")
            xa = x
            if c.lora_dropout > 0 and self.has_rng("lora_dropout"):
                # the barrier keeps the mask its own kernel: fused into the matmul's operand, threefry's ~100 ops a
                # draw made the TPU compile of a LoRA train step 5x slower (docs/lora.md, "Fit and speed")
                keep = jax.lax.optimization_barrier(jax.random.bernoulli(self.make_rng("lora_dropout"), 1.0 - c.lora_dropout, x.shape))
                xa = jnp.where(keep, x / jnp.asarray(1.0 - c.lora_dropout, dtype), jnp.zeros((), dtype))
            h = jax.lax.dot_general(xa, a.astype(dtype), dims)
            y = y + jax.lax.dot_general(h, b.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())))
        if self.bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.dtype(c.param_dtype)).astype(dtype)
        return y


class AttentionWeights(nn.Module):
    """q/k/v/o projections, plus FlexAttention's k_proj_hd / v_proj_hd when enabled.

    ``text.attention_bias`` (Qwen2) puts biases on q/k/v and on the HR k/v projections (which then start
    as copies of k/v's, bias included); o has none in every family."""

    cfg: ModelConfig

    def setup(self) -> None:
        c, t = self.cfg, self.cfg.text
        dense = functools.partial(Linear, cfg=c)
        biased = functools.partial(dense, bias=t.attention_bias)
        self.q = biased(t.num_heads * t.head_dim)
        self.k = biased(t.num_kv_heads * t.head_dim)
        self.v = biased(t.num_kv_heads * t.head_dim)
        self.o = dense(t.hidden_size)
        if c.flex.enabled:
            self.k_hr = biased(t.num_kv_heads * t.head_dim)
            self.v_hr = biased(t.num_kv_heads * t.head_dim)

    def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        t = self.cfg.text
        split = lambda y, h: y.reshape(*y.shape[:-1], h, t.head_dim)
        return split(self.q(x), t.num_heads), split(self.k(x), t.num_kv_heads), split(self.v(x), t.num_kv_heads)

    def hr_kv(self, features: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """HR keys (with image RoPE) and values from projector features ``(..., K, D)``."""
        t = self.cfg.text
        k = self.k_hr(features).reshape(*features.shape[:-1], t.num_kv_heads, t.head_dim)
        v = self.v_hr(features).reshape(*features.shape[:-1], t.num_kv_heads, t.head_dim)
        return apply_rope(k, cos, sin), v

    def out(self, o: jax.Array) -> jax.Array:
        return self.o(o.reshape(*o.shape[:-2], -1))

    def touch_all(self, x: jax.Array) -> jax.Array:
        """Used at init so that every projection creates its parameters."""
        q, k, v = self.qkv(x)
        y = self.out(q)
        if self.cfg.flex.enabled:
            y = y + self.k_hr(x).sum() + self.v_hr(x).sum()
        return y


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, t = self.cfg, self.cfg.text
        dense = functools.partial(Linear, cfg=c)
        h = nn.silu(dense(t.intermediate_size, name="gate")(x)) * dense(t.intermediate_size, name="up")(x)
        return dense(t.hidden_size, name="down")(h)
