"""PyTorch test oracle of the FlexAttention release's semantics (written from docs/flexattention-spec.md).

It runs on a transformers ``LlavaForConditionalGeneration`` (fp32) plus per-layer ``k_proj_hd`` /
``v_proj_hd`` weights. The CLIP tower and projector are the HF modules; the Llama decoder is written
here (RMSNorm, rotate-half RoPE, GQA, SwiGLU) so that it is independent of HF's attention code.
Like the release: batch items one at a time, eager, dense N x (N+M) scores, -65504 HR masking,
boolean indexing. Slow by design; for tiny models only.

Public API: :class:`OracleFlexConfig`, :func:`encode_dual_path`, :func:`select_hr_mask`,
:func:`image_rope`, :func:`oracle_forward`, :func:`oracle_generate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

NEG = -65504.0  # the release's additive mask value for HR columns


@dataclass
class OracleFlexConfig:
    """FlexAttention settings (see the spec). ``first_select_layer`` makes the first mask; later layers are hierarchical."""

    lowres_size: int
    highres_size: int
    zoom_ratio: int = 3
    threshold: float = 64.0
    first_select_layer: int = 8
    pool_size: int = 9
    hr_mode: str = "release"  # 'release' | 'paper'
    selection: str = "attention"  # 'attention' | 'all'
    hr_budget: int | None = None  # K; None = all M


@dataclass
class _Flex:
    """Per-sample HR context."""

    rows: torch.Tensor  # (R,) query-row indices of the select rows
    img: tuple[int, int]  # image columns [begin, end) in key coordinates
    hd: torch.Tensor  # (M, D) HR features
    cos: torch.Tensor  # (M, d) image RoPE
    sin: torch.Tensor
    ori_size: tuple[int, int]  # (w, h)
    alpha: float | None  # None: select rows' output is replaced; else blended
    masks: dict = field(default_factory=dict)
    maps: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def _lm(model):
    return model.model.language_model


def _dims(model) -> tuple[int, int, int]:
    tc = model.config.text_config
    d = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return tc.num_attention_heads, tc.num_key_value_heads, d


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _cos_sin(model, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (n, d) of the model's own rotary embedding at integer positions (n,)."""
    dummy = torch.zeros(1, dtype=torch.float32)
    cos, sin = _lm(model).rotary_emb(dummy, positions[None].long())
    return cos[0].float(), sin[0].float()


def _grid(model) -> int:
    vc = model.config.vision_config
    return vc.image_size // vc.patch_size


# ----------------------------------------------------------------------------- vision


def _encode(model, pixels: torch.Tensor) -> torch.Tensor:
    """CLIP hidden_states[vision_feature_layer], CLS dropped ('default'), projector: (n, g*g, D)."""
    layer = model.config.vision_feature_layer
    assert isinstance(layer, int), "only a single vision_feature_layer is supported"
    out = model.model.vision_tower(pixels.float(), output_hidden_states=True)
    feat = out.hidden_states[layer]
    if model.config.vision_feature_select_strategy == "default":
        feat = feat[:, 1:]
    return model.model.multi_modal_projector(feat).float()


@torch.no_grad()
def encode_dual_path(model, pixel_values_hr: torch.Tensor, cfg: OracleFlexConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """LR features (B, g*g, D) of the antialiased-bilinear downscale, and HR features (B, M, D) of the zoom x zoom tiles."""
    px = pixel_values_hr.float()
    lr = F.interpolate(px, size=cfg.lowres_size, mode="bilinear", antialias=True)
    lr_feat = _encode(model, lr)
    if cfg.highres_size <= cfg.lowres_size:
        return lr_feat, lr_feat.clone()
    z, s = cfg.zoom_ratio, cfg.lowres_size
    assert px.shape[-1] == px.shape[-2] == z * s, f"HR image must be {z * s} px square, got {tuple(px.shape)}"
    b = px.shape[0]
    tiles = torch.stack([px[:, :, i * s : (i + 1) * s, j * s : (j + 1) * s] for i in range(z) for j in range(z)], 1)
    feat = _encode(model, tiles.flatten(0, 1))  # (B*z*z, g*g, D)
    g = int(round(feat.shape[1] ** 0.5))
    dim = feat.shape[-1]
    feat = feat.reshape(b, z, z, g, g, dim).permute(0, 1, 3, 2, 4, 5)  # (B, tile_row, g_row, tile_col, g_col, D)
    return lr_feat, feat.reshape(b, z * g * z * g, dim)


def image_rope(model, img_positions: torch.Tensor, hd_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HR-key RoPE: cos/sin at the g*g LR image positions, (g, g, d) bicubic-resized to (hd_side, hd_side): (M, d) each."""
    cos, sin = _cos_sin(model, img_positions)
    g = int(round(cos.shape[0] ** 0.5))

    def up(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(g, g, -1).permute(2, 0, 1)[None]
        t = F.interpolate(t, size=(hd_side, hd_side), mode="bicubic", align_corners=False)
        return t[0].flatten(1).T.contiguous()

    return up(cos), up(sin)


# ----------------------------------------------------------------------------- selection


def select_hr_mask(
    amap: torch.Tensor, ori_size: tuple[int, int], cfg: OracleFlexConfig, hd_side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention map (R, g*g) -> (bool mask (R, M), score (R, M)); the spec's steps 3-7 plus top-K truncation.

    score is the nearest-upsampled adaptive max pool of the min-max-normalised map (NaN for constant maps).
    """
    r, gg = amap.shape
    g = int(round(gg**0.5))
    a = amap.float().reshape(r, g, g).clone()
    w, h = ori_size
    margin = abs(w - h) // 2
    m = int(margin / max(w, h) * g)
    if m != 0:
        if w > h:
            a[:, :m, :] = 0.0
            a[:, -m:, :] = 0.0
        else:
            a[:, :, :m] = 0.0
            a[:, :, -m:] = 0.0
    a = a.flatten(1)
    lo = a.min(1, keepdim=True).values
    hi = a.max(1, keepdim=True).values
    a = ((a - lo) / (hi - lo)).reshape(r, 1, g, g)
    ps = (cfg.pool_size, cfg.pool_size)
    binary = (a * 255 > cfg.threshold).float()
    mask = F.interpolate(F.adaptive_max_pool2d(binary, ps), size=hd_side, mode="nearest").bool().flatten(1)
    score = F.interpolate(F.adaptive_max_pool2d(a, ps), size=hd_side, mode="nearest").flatten(1)
    if cfg.selection == "all":
        mask = torch.ones_like(mask)
        score = torch.zeros_like(score)
    return _truncate(mask, score, cfg.hr_budget), score


def _truncate(mask: torch.Tensor, score: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep, per row, the K selected tokens with the highest score (ties: lower index first)."""
    if k is None or k >= mask.shape[1]:
        return mask
    out = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        idx = mask[i].nonzero().flatten()
        if idx.numel() > k:
            order = torch.sort(score[i, idx], descending=True, stable=True).indices
            idx = idx[order[:k]]
        out[i, idx] = True
    return out


# ----------------------------------------------------------------------------- decoder


def _layer(model, hd_weights, cfg, li, x, cos, sin, bias, past, flex):
    """One decoder layer for one sample. x (n, D); bias (n, kv) additive; past (K, V) or None.

    Returns the new hidden state and the (K, V) of all keys (past + new, RoPE'd, Hkv heads).
    Records this layer's mask / map in ``flex`` when it is a selecting layer.
    """
    lyr = _lm(model).layers[li]
    att = lyr.self_attn
    nh, nkv, d = _dims(model)
    n = x.shape[0]

    xn = _rmsnorm(x, lyr.input_layernorm.weight, lyr.input_layernorm.variance_epsilon)
    q = F.linear(xn, att.q_proj.weight, att.q_proj.bias).view(n, nh, d).transpose(0, 1)  # biases: Qwen2
    k = F.linear(xn, att.k_proj.weight, att.k_proj.bias).view(n, nkv, d).transpose(0, 1)
    v = F.linear(xn, att.v_proj.weight, att.v_proj.bias).view(n, nkv, d).transpose(0, 1)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    if past is not None:
        k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
    rep = nh // nkv
    kr, vr = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    scores = q @ kr.transpose(1, 2) / math.sqrt(d) + bias  # (H, n, kv)

    fsl = cfg.first_select_layer if cfg is not None else None
    hier = flex is not None and li > fsl and flex.rows.numel() > 0
    if hier:
        wk, wv, *bias_hd = hd_weights[li]  # (k, v weights[, k, v biases])
        bk, bv = bias_hd or (None, None)
        m_hr = flex.hd.shape[0]
        khd = _rope(F.linear(flex.hd, wk.float(), bk).view(m_hr, nkv, d).transpose(0, 1), flex.cos, flex.sin)
        vhd = F.linear(flex.hd, wv.float(), bv).view(m_hr, nkv, d).transpose(0, 1)
        s_hr = q @ khd.repeat_interleave(rep, 0).transpose(1, 2) / math.sqrt(d)  # (H, n, M)
        vals = torch.cat([vr, vhd.repeat_interleave(rep, 0)], 1)
        probs = torch.softmax(torch.cat([scores, s_hr + NEG], -1), -1, dtype=torch.float32)
        out = probs @ vals
        sel_bias = torch.where(flex.masks[li - 1], 0.0, NEG)  # (R, M)
        s_sel = torch.cat([scores[:, flex.rows], s_hr[:, flex.rows] + sel_bias], -1)
        out_sel = torch.softmax(s_sel, -1, dtype=torch.float32) @ vals
        if flex.alpha is None:
            out[:, flex.rows] = out_sel
        else:
            out[:, flex.rows] = out[:, flex.rows] * (1.0 - flex.alpha) + out_sel * flex.alpha
    else:
        probs = torch.softmax(scores, -1, dtype=torch.float32)
        out = probs @ vr

    if flex is not None and li >= fsl:
        b, e = flex.img
        amap = probs[:, flex.rows, b:e].sum(0)  # (R, g*g)
        hd_side = int(round(flex.hd.shape[0] ** 0.5))
        flex.maps[li] = amap
        flex.masks[li] = select_hr_mask(amap, flex.ori_size, cfg, hd_side)[0]

    h = x + out.transpose(0, 1).reshape(n, nh * d) @ att.o_proj.weight.T
    hn = _rmsnorm(h, lyr.post_attention_layernorm.weight, lyr.post_attention_layernorm.variance_epsilon)
    mlp = lyr.mlp
    assert model.config.text_config.hidden_act == "silu"
    h = h + (F.silu(hn @ mlp.gate_proj.weight.T) * (hn @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return h, (k, v)


def _decoder(model, hd_weights, cfg, x, positions, bias, flex, past=None):
    """All layers for one sample: (hidden states [L+1 x (n, D)], logits (n, V), cache [L x (K, V)])."""
    cos, sin = _cos_sin(model, positions)
    hs, cache = [x], []
    for li in range(len(_lm(model).layers)):
        x, kv = _layer(model, hd_weights, cfg, li, x, cos, sin, bias, None if past is None else past[li], flex)
        hs.append(x)
        cache.append(kv)
    norm = _lm(model).norm
    logits = _rmsnorm(x, norm.weight, norm.variance_epsilon) @ model.lm_head.weight.float().T
    return hs, logits, cache


def _label_rows(labels: torch.Tensor) -> torch.Tensor:
    """Rows x-1..y-1 for every maximal run x..y of labels != -100."""
    ids = (labels != -100).nonzero().flatten().tolist()
    rows = [i - 1 for i in ids if i >= 1]
    return torch.tensor(rows, dtype=torch.long)


def _prepare_sample(model, cfg, ids, am, labels, lr, hd, ori, alpha, image):
    """Embeddings, positions, additive bias and HR context of one sample."""
    n = ids.shape[0]
    lm = _lm(model)
    x = lm.embed_tokens.weight.float()[ids].clone()
    positions = (am.long().cumsum(0) - 1).masked_fill(am == 0, 1)
    valid = am.bool()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    bias = torch.zeros(n, n).masked_fill(~(causal & valid[None, :]), torch.finfo(torch.float32).min)
    img_pos = (ids == model.config.image_token_id).nonzero().flatten()
    if img_pos.numel() == 0 or not image:
        return x, positions, bias, None
    g = _grid(model)
    b, e = int(img_pos[0]), int(img_pos[-1]) + 1
    assert e - b == g * g == img_pos.numel(), "expected one contiguous run of g*g image placeholders"
    x[b:e] = lr
    if cfg is None:
        return x, positions, bias, None
    if cfg.hr_mode == "paper":
        rows, alpha = valid.nonzero().flatten(), None
    elif cfg.hr_mode == "release":
        if labels is None:
            rows, alpha = valid.nonzero().flatten()[-1:], None
        else:
            rows, alpha = _label_rows(labels), float(alpha)
    else:
        raise ValueError(cfg.hr_mode)
    hd_side = int(round(hd.shape[0] ** 0.5))
    icos, isin = image_rope(model, positions[b:e], hd_side)
    return x, positions, bias, _Flex(rows, (b, e), hd, icos, isin, tuple(int(v) for v in ori), alpha)


@torch.no_grad()
def oracle_forward(
    model,
    hd_weights,
    cfg: OracleFlexConfig | None,
    input_ids: torch.Tensor,
    pixel_values_hr: torch.Tensor | None,
    ori_sizes,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> dict:
    """Full FlexAttention forward (fp32), one sample at a time.

    input_ids (B, N) with one run of g*g image placeholders per image sample (or none: text-only).
    pixel_values_hr (n_img, 3, H, H) and ori_sizes [(w, h)] are per image sample in batch order
    (n_img == B is also accepted and then indexed by sample). ``cfg=None`` gives plain LLaVA.
    'release' mode: labels None is inference (select row = last non-pad row, output replaced);
    labels given is training (select rows = label positions - 1, blended with ``alpha``). 'paper'
    mode: every non-pad row is a select row, output replaced. Returns logits (B, N, V),
    hidden_states [L+1 x (B, N, D)] (embeddings then raw layer outputs, no final norm), masks /
    maps: per sample {layer: (R, M) bool / (R, g*g) float}, the mask made at ``layer`` (used by
    layer+1) and the raw head-summed probabilities it came from (before margin zeroing), and
    rows: per sample the (R,) select-row indices. Text-only samples get empty dicts.
    """
    bsz, n = input_ids.shape
    am = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    has_img = (input_ids == model.config.image_token_id).any(1)
    if pixel_values_hr is not None and has_img.any():
        ecfg = cfg or OracleFlexConfig(lowres_size=pixel_values_hr.shape[-1], highres_size=pixel_values_hr.shape[-1])
        lr_all, hd_all = encode_dual_path(model, pixel_values_hr, ecfg)
        aligned = pixel_values_hr.shape[0] == bsz
        img_index = torch.arange(bsz) if aligned else has_img.long().cumsum(0) - 1
    out_logits, out_hs, masks, maps, rows = [], [], [], [], []
    for i in range(bsz):
        img = bool(has_img[i]) and pixel_values_hr is not None
        j = int(img_index[i]) if img else 0
        x, pos, bias, flex = _prepare_sample(
            model,
            cfg,
            input_ids[i],
            am[i],
            None if labels is None else labels[i],
            lr_all[j] if img else None,
            hd_all[j] if img else None,
            ori_sizes[j] if img else None,
            alpha,
            img,
        )
        hs, logits, _ = _decoder(model, hd_weights, cfg, x, pos, bias, flex)
        out_logits.append(logits)
        out_hs.append(hs)
        masks.append({} if flex is None else dict(flex.masks))
        maps.append({} if flex is None else dict(flex.maps))
        rows.append(torch.zeros(0, dtype=torch.long) if flex is None else flex.rows)
    return dict(
        logits=torch.stack(out_logits),
        hidden_states=[torch.stack([h[li] for h in out_hs]) for li in range(len(out_hs[0]))],
        masks=masks,
        maps=maps,
        rows=rows,
    )


@torch.no_grad()
def oracle_generate(
    model,
    hd_weights,
    cfg: OracleFlexConfig,
    input_ids: torch.Tensor,
    pixel_values_hr: torch.Tensor,
    ori_sizes,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> dict:
    """Greedy cached generation with the release's semantics (batch 1, no padding).

    Prefill: the last prompt row is the select row ('paper': every row). Decode: the new token is
    the only row, hence the select row, in every layer; its cached K/V are those computed then.
    Returns tokens [int], step_logits [(V,)], step_masks [{layer: (R, M) bool}] and step_maps
    [{layer: (R, g*g)}]; entry t belongs to the step that produced tokens[t] (t=0: prefill).
    """
    assert input_ids.shape[0] == 1, "batch 1 only"
    ids = input_ids[0]
    n = ids.shape[0]
    lr, hd = encode_dual_path(model, pixel_values_hr, cfg)
    x, pos, bias, flex = _prepare_sample(model, cfg, ids, torch.ones_like(ids), None, lr[0], hd[0], ori_sizes[0], None, True)
    _, logits, cache = _decoder(model, hd_weights, cfg, x, pos, bias, flex)
    tokens, step_logits, step_masks, step_maps = [], [], [], []

    def emit(lg, fl):
        step_logits.append(lg)
        step_masks.append({} if fl is None else dict(fl.masks))
        step_maps.append({} if fl is None else dict(fl.maps))
        tok = int(torch.argmax(lg))
        tokens.append(tok)
        return tok

    tok = emit(logits[-1], flex)
    emb = _lm(model).embed_tokens.weight.float()
    for t in range(1, max_new_tokens):
        if eos_token_id is not None and tok == eos_token_id:
            break
        if flex is not None:
            flex = _Flex(torch.tensor([0]), flex.img, flex.hd, flex.cos, flex.sin, flex.ori_size, None)
        x = emb[tok][None]
        kv_len = n + t
        _, logits, cache = _decoder(
            model, hd_weights, cfg, x, torch.tensor([kv_len - 1]), torch.zeros(1, kv_len), flex, past=cache
        )
        tok = emit(logits[-1], flex)
    return dict(tokens=tokens, step_logits=step_logits, step_masks=step_masks, step_maps=step_maps)
