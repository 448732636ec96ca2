"""The vision tower (CLIP or SigLIP), the LLaVA projector, and FlexAttention's dual-path image encoder."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from flexattn_jax import sharding as S
from flexattn_jax.attention import attention_with_lse
from flexattn_jax.config import ModelConfig


def _act(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return functools.partial(jax.nn.gelu, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return functools.partial(jax.nn.gelu, approximate=True)
    raise ValueError(f"unsupported activation {name!r}")


def _dense(cfg: ModelConfig, features: int, **kw) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.initializers.normal(0.02),
        **kw,
    )


def _layer_norm(cfg: ModelConfig, **kw) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.vision.layer_norm_eps,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        use_fast_variance=False,
        **kw,
    )


class VisionStem(nn.Module):
    """CLIP: patch embedding (conv, no bias), class token, position embeddings, pre-LayerNorm.
    SigLIP: patch embedding (conv with bias) and position embeddings only."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, pixels: Float[Array, "N S S C"]) -> Float[Array, "N P1 Dv"]:
        v, dt = self.cfg.vision, jnp.dtype(self.cfg.dtype)
        x = nn.Conv(
            v.hidden_size,
            (v.patch_size, v.patch_size),
            strides=(v.patch_size, v.patch_size),
            padding="VALID",
            use_bias=not v.class_token,
            dtype=dt,
            param_dtype=jnp.dtype(self.cfg.param_dtype),
            kernel_init=nn.initializers.normal(0.02),
            name="patch_embed",
        )(pixels.astype(dt))
        n = x.shape[0]
        x = x.reshape(n, -1, v.hidden_size)
        if v.class_token:
            cls = self.param("class_embed", nn.initializers.normal(0.02), (v.hidden_size,), jnp.dtype(self.cfg.param_dtype))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (n, 1, v.hidden_size)), x], axis=1)
        pos = nn.Embed(
            v.num_patches + (1 if v.class_token else 0),
            v.hidden_size,
            dtype=dt,
            param_dtype=jnp.dtype(self.cfg.param_dtype),
            embedding_init=nn.initializers.normal(0.02),
            name="pos_embed",
        )(jnp.arange(x.shape[1]))
        if not v.class_token:
            return x + pos[None]
        return _layer_norm(self.cfg, name="pre_norm")(x + pos[None])


class VisionAttention(nn.Module):
    """Multi-head self-attention of CLIP (biases on q/k/v/o, no mask)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        v = self.cfg.vision
        split = lambda y: y.reshape(*y.shape[:-1], v.num_heads, v.head_dim)
        q, k, val = (split(_dense(self.cfg, v.hidden_size, name=n)(h)) for n in ("q", "k", "v"))
        o, _ = attention_with_lse(q, k, val, None)
        return _dense(self.cfg, v.hidden_size, name="o")(o.reshape(*o.shape[:-2], -1))


class VisionMLP(nn.Module):
    """fc1, activation (quick-GELU for CLIP), fc2."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        v = self.cfg.vision
        h = _act(v.hidden_act)(_dense(self.cfg, v.intermediate_size, name="fc1")(h))
        return _dense(self.cfg, v.hidden_size, name="fc2")(h)


class VisionLayer(nn.Module):
    """Pre-LN transformer block."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Float[Array, "N P1 Dv"]) -> Float[Array, "N P1 Dv"]:
        x = x + VisionAttention(self.cfg, name="attn")(_layer_norm(self.cfg, name="norm1")(x))
        return x + VisionMLP(self.cfg, name="mlp")(_layer_norm(self.cfg, name="norm2")(x))


class Projector(nn.Module):
    """LLaVA ``mlp2x_gelu`` (Linear, GELU, Linear) or ``linear`` projector."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Float[Array, "N P Dv"]) -> Float[Array, "N P D"]:
        p, d = self.cfg.projector, self.cfg.text.hidden_size
        x = _dense(self.cfg, d, use_bias=p.bias, name="linear_1")(x)
        if p.type == "mlp2x_gelu":
            x = _dense(self.cfg, d, use_bias=p.bias, name="linear_2")(_act(p.hidden_act)(x))
        return x


_STEM_KEYS = ("patch_embed", "class_embed", "pos_embed", "pre_norm")


def clip_features(vision_params: dict, cfg: ModelConfig, pixels: Float[Array, "N S S C"]) -> Float[Array, "N P Dv"]:
    """The tower's hidden state at ``vision_feature_layer`` (its first token dropped for the 'default' strategy:
    CLIP's class token; transformers' LLaVA drops SigLIP's first patch the same way)."""
    stem = {k: vision_params[k] for k in _STEM_KEYS if k in vision_params}
    x = VisionStem(cfg).apply({"params": stem}, S.constrain_batch(pixels))
    n = cfg.vision_layers_used
    layers = jax.tree.map(lambda a: a[:n], vision_params["layers"])
    layer = VisionLayer(cfg)

    def body(x, p):  # each layer's input stays batch-sharded under a mesh (sharding.constrain_batch)
        return layer.apply({"params": p}, S.constrain_batch(x)), None

    if cfg.scan_layers:
        x, _ = jax.lax.scan(body, x, layers)
    else:
        for i in range(n):
            x, _ = body(x, jax.tree.map(lambda a, i=i: a[i], layers))
    return x[:, 1:] if cfg.vision_feature_select_strategy == "default" else x


def encode_images(params: dict, cfg: ModelConfig, pixels: Float[Array, "N S S C"]) -> Float[Array, "N P D"]:
    """CLIP features through the projector: LLaVA's image tokens."""
    feats = clip_features(params["vision"], cfg, pixels)
    return Projector(cfg).apply({"params": params["projector"]}, feats)


def downsample_lowres(images: Float[Array, "B H W C"], size: int) -> Float[Array, "B s s C"]:
    """PyTorch ``interpolate(mode='bilinear', antialias=True)`` to the LR size."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    b, _, _, c = images.shape
    return jax.image.resize(images.astype(jnp.float32), (b, size, size, c), method="linear", antialias=True).astype(images.dtype)


def dual_path(
    params: dict, cfg: ModelConfig, images: Float[Array, "B H H C"]
) -> tuple[Float[Array, "B G D"], Float[Array, "B M D"]]:
    """FlexAttention's two views of one HR image, in one batched CLIP call.

    LR: the image resized to ``lowres_size``: the G tokens that go into the sequence. HR: the
    zoom x zoom tiles, each encoded like the LR view and placed at its position on the
    (zoom g) x (zoom g) grid, flattened row-major: the M side tokens (no gradient).
    """
    b, s = images.shape[0], cfg.flex.lowres_size
    z, g = cfg.zoom, cfg.lr_grid
    if images.shape[1] != cfg.image_size or images.shape[2] != cfg.image_size:
        raise ValueError(f"pixel_values are {images.shape[1]}x{images.shape[2]}; this model takes {cfg.image_size}x{cfg.image_size}")
    lowres = downsample_lowres(images, s)
    if z == 1:
        lr = encode_images(params, cfg, lowres)
        return lr, jax.lax.stop_gradient(lr)
    tiles = images.reshape(b, z, s, z, s, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, z * z, s, s, -1)
    # each sample's views side by side (LR, then its tiles row-major): a batch-sharded CLIP call keeps a
    # sample's views on the device that holds the sample
    views = jnp.concatenate([lowres[:, None].astype(tiles.dtype), tiles], axis=1).reshape(b * (1 + z * z), s, s, -1)
    feats = encode_images(params, cfg, views)
    feats = feats.reshape(b, 1 + z * z, *feats.shape[1:])
    lr = feats[:, 0]
    hr = feats[:, 1:].reshape(b, z, z, g, g, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, z * g * z * g, -1)
    return lr, jax.lax.stop_gradient(hr)
