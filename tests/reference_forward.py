"""The op-by-op reference forward of every transformer block edgetune runs — tests only.

edgetune's forward is one C++ call per block range (cpp_ext block.h, Transformer.layer_forward).
This module keeps the Python blocks it replaced, as the references it is checked against:

  ops_layer(net, i, h, perturb)     the C++ pieces driven one by one from Python (fused q/k/v and
                                    gate/up GEMMs, kernels.rms_norm, kernels.attention with RoPE and
                                    the sliding window, silu_mul / gelu_mul), the trainable set's
                                    hooks applied in between in torch (linear_extra: LoRA, then the
                                    sparse deltas by index_add).  Same op order as the block: the
                                    block must equal it bit for bit (LoRA: its own fp32 GEMM order).
  torch_layer(net, i, h, perturb)   the independent one: torch attention (scaled_dot_product_attention
                                    with a causal / sliding-window mask), torch RoPE, F.silu /
                                    F.gelu(tanh), the hooks in torch, and the dense float weights of
                                    to_dense() below when they are set (the float64 / bf16
                                    baselines).  The block agrees with it to float32 rounding, up
                                    to an int8 activation step (bounds in tests/test_block.py).

install(net, layer=torch_layer) makes a model run its blocks through a reference (model.logits,
hidden states, streamed layers included), e.g. the float64 dense reference of tests/test_onnx.py.
ops_layer/torch_layer take h as torch float32 [B, T, n_embd] or numpy and return torch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from edgetune import kernels


def _torch(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def rope(net, T: int, i: int):
    """The layer's cos/sin tables [T, rope_dim/2] as torch float32 (the model's own tables)."""
    cos, sin = net.rope(T, i)
    return _torch(cos).float(), _torch(sin).float()


def linear(net, x, qt, perturb=None):
    """x @ W^T (the model's dense weight when to_dense() set one, else kernels.qgemm with the
    hooks' scale perturbation) + the hooks' linear_extra."""
    shp = x.shape
    x2 = x.reshape(-1, shp[-1]).contiguous()
    if getattr(net, "dense", None) is not None and qt.name in net.dense:
        w = net.dense[qt.name]
        y = (x2.to(w.dtype) @ w.T).float()
    else:
        y = kernels.qgemm(x2, qt, perturb=net.hooks.scale_perturbation(qt, perturb))
    y = net.hooks.linear_extra(qt, x2, y, perturb)
    return y.reshape(*shp[:-1], qt.shape[0])


def linear_multi(net, x, qts, perturb=None) -> list:
    """[linear(net, x, qt) for qt in qts] with one fused kernels.qgemm_multi call (bit-identical)."""
    if getattr(net, "dense", None) is not None:
        return [linear(net, x, qt, perturb) for qt in qts]
    shp = x.shape
    x2 = x.reshape(-1, shp[-1]).contiguous()
    hk = net.hooks
    y = kernels.qgemm_multi(x2, qts, [hk.scale_perturbation(qt, perturb) for qt in qts])
    outs, o = [], 0
    for qt in qts:
        n = qt.shape[0]
        outs.append(hk.linear_extra(qt, x2, y[:, o:o + n], perturb).reshape(*shp[:-1], n))
        o += n
    return outs


def norm(net, x, name: str, weight, perturb=None):
    """RMSNorm with the hooks' weight: kernels.rms_norm on float32, the torch formula otherwise."""
    w = _torch(net.hooks.norm_weight(name, weight, perturb))
    if getattr(net, "dense", None) is None and x.dtype == torch.float32 and w.dtype == torch.float32:
        return kernels.rms_norm(x, w, net.config.rms_eps)
    w = w.to(x.dtype)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + net.config.rms_eps) * w


def torch_rope(x, cos, sin, d: int, mode: str):
    """RoPE in torch on the first d dims of each head of x [..., head_dim] (cos/sin [T, d/2]):
    "normal" rotates pairs (2i, 2i+1), "neox" pairs (i, i + d/2).  Also the torch baselines'
    RoPE (benchmarks/baseline_forward.py, fo_baseline.DenseLM)."""
    xr, xp = x[..., :d], x[..., d:]
    if mode == "normal":
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : d // 2], xr[..., d // 2:]
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out if xp.shape[-1] == 0 else torch.cat([out, xp], dim=-1)


def apply_rope(net, x, cos, sin):
    """x: [B, H, T, head_dim]; rotates the first rope_dim dims of each head."""
    return torch_rope(x, cos.to(x.dtype), sin.to(x.dtype), net.config.rope_dim, net.config.rope_mode)


def _qkv(net, i, x, perturb):
    c, L = net.config, net.layers[i]
    if c.spec.fused:
        q, k, v = linear(net, x, L.w["attn_qkv"], perturb).split([c.q_dim, c.kv_dim, c.kv_dim], -1)
    else:
        q, k, v = linear_multi(net, x, [L.w[n] for n in ("attn_q", "attn_k", "attn_v")], perturb)
    if L.bias:
        nw = net.hooks.norm_weight
        q = q + _torch(nw(f"blk.{i}.attn_q.bias", L.bias["attn_q"], perturb)).to(q.dtype)
        k = k + _torch(nw(f"blk.{i}.attn_k.bias", L.bias["attn_k"], perturb)).to(k.dtype)
        v = v + _torch(nw(f"blk.{i}.attn_v.bias", L.bias["attn_v"], perturb)).to(v.dtype)
    return q, k, v


def _gate_up(net, i, x, perturb):
    c, L = net.config, net.layers[i]
    if c.spec.fused:
        return linear(net, x, L.w["ffn_up"], perturb).split([c.n_ff, c.n_ff], -1)
    return linear_multi(net, x, [L.w["ffn_gate"], L.w["ffn_up"]], perturb)


def ops_layer(net, i: int, h, perturb=None) -> torch.Tensor:
    """One block with the C++ pieces driven op by op on token-major rows (see the module doc)."""
    c, L = net.config, net.layers[i]
    h = _torch(h)
    B, T, D = h.shape
    h2 = h.reshape(B * T, D)
    x = norm(net, h2, f"blk.{i}.attn_norm.weight", L.attn_norm, perturb)
    q, k, v = _qkv(net, i, x, perturb)
    if c.spec.qk_norm:   # RMSNorm over each head's head_dim values
        hd = c.head_dim
        q = norm(net, q.reshape(-1, hd), f"blk.{i}.attn_q_norm.weight", L.norms["attn_q_norm"],
                 perturb).reshape(B * T, c.q_dim)
        k = norm(net, k.reshape(-1, hd), f"blk.{i}.attn_k_norm.weight", L.norms["attn_k_norm"],
                 perturb).reshape(B * T, c.kv_dim)
    cos, sin = rope(net, T, i)
    window = c.swa_window if i in c.swa_layers else 0
    a = kernels.attention(q, k, v, B, T, c.n_head, c.n_head_kv, cos, sin, c.rope_mode == "neox",
                          c.attn_scale or 1.0 / math.sqrt(c.head_dim), window=window)
    o = linear(net, a, L.w["attn_output"], perturb)
    if c.spec.post_norms:
        o = norm(net, o, f"blk.{i}.post_attention_norm.weight", L.norms["post_attention_norm"],
                 perturb)
    h2 = h2 + o
    x = norm(net, h2, f"blk.{i}.ffn_norm.weight", L.ffn_norm, perturb)
    gate, up = _gate_up(net, i, x, perturb)
    act = kernels.gelu_mul(gate, up) if c.spec.act == "gelu_tanh" else kernels.silu_mul(gate, up)
    y = linear(net, act, L.w["ffn_down"], perturb)
    if c.spec.post_norms:
        y = norm(net, y, f"blk.{i}.post_ffw_norm.weight", L.norms["post_ffw_norm"], perturb)
    return (h2 + y).reshape(B, T, D)


def attn_mask(net, T: int, i: int):
    """None (plain causal) or a bool [T, T] mask: causal and, on a sliding-window layer, only the
    last swa_window positions (llama.cpp: key j is hidden from query p when p - j >= window)."""
    c = net.config
    if i not in c.swa_layers:
        return None
    p = torch.arange(T)
    d = p[:, None] - p[None, :]
    return (d >= 0) & (d < c.swa_window)


def torch_layer(net, i: int, h, perturb=None) -> torch.Tensor:
    """One block of any architecture in archs.py in torch (see the module doc): fused or separate
    q/k/v, q/k head norms, RoPE with the layer's own tables, sliding-window or global causal
    attention, post norms, SiLU or GELU(tanh) gated FFN; the GEMMs through `linear`."""
    c, L = net.config, net.layers[i]
    h = _torch(h)
    B, T, D = h.shape
    x = norm(net, h, f"blk.{i}.attn_norm.weight", L.attn_norm, perturb)
    q, k, v = _qkv(net, i, x, perturb)
    hd = c.head_dim
    q = q.reshape(B, T, c.n_head, hd)
    k = k.reshape(B, T, c.n_head_kv, hd)
    v = v.reshape(B, T, c.n_head_kv, hd)
    if c.spec.qk_norm:
        q = norm(net, q, f"blk.{i}.attn_q_norm.weight", L.norms["attn_q_norm"], perturb)
        k = norm(net, k, f"blk.{i}.attn_k_norm.weight", L.norms["attn_k_norm"], perturb)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = rope(net, T, i)
    q, k = apply_rope(net, q, cos, sin), apply_rope(net, k, cos, sin)
    mask = attn_mask(net, T, i)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                       scale=c.attn_scale or 1.0 / math.sqrt(hd),
                                       enable_gqa=c.n_head != c.n_head_kv)
    a = a.transpose(1, 2).reshape(B, T, c.q_dim)
    o = linear(net, a, L.w["attn_output"], perturb)
    if c.spec.post_norms:
        o = norm(net, o, f"blk.{i}.post_attention_norm.weight", L.norms["post_attention_norm"],
                 perturb)
    h = h + o
    x = norm(net, h, f"blk.{i}.ffn_norm.weight", L.ffn_norm, perturb)
    gate, up = _gate_up(net, i, x, perturb)
    act = F.gelu(gate, approximate="tanh") if c.spec.act == "gelu_tanh" else F.silu(gate)
    y = linear(net, act * up, L.w["ffn_down"], perturb)
    if c.spec.post_norms:
        y = norm(net, y, f"blk.{i}.post_ffw_norm.weight", L.norms["post_ffw_norm"], perturb)
    return h + y


def to_dense(net, dtype=torch.bfloat16):
    """Make net a dense torch baseline (this instance only): every matrix dequantized into a
    dense weight of `dtype` (net.dense, which linear() above uses), the blocks run by the torch
    reference (install), and the full-vocabulary head a dense matmul of the final normed states.
    Label-word rows keep the model's own fp32 rows.  Returns net."""
    from edgetune.quant import dequantize
    net.dense = {qt.name: torch.from_numpy(dequantize(qt)).to(dtype)
                 for qt in net.qtensors().values()}
    install(net)
    own_head = net.head

    def head(h, perturb=None, rows=None):
        if rows is not None:
            return own_head(h, perturb, rows)
        x = net.final_norm(h, perturb)
        w = net.dense[net.output.name]
        lg = (torch.from_numpy(np.ascontiguousarray(x)).to(w.dtype) @ w.T).float().numpy()
        extra = getattr(net.hooks, "vocab_logits_delta", None)
        return lg if extra is None else extra(x, lg, perturb)
    net.head = head
    return net


def install(net, layer=torch_layer):
    """Run net's blocks through `layer` (this instance only): Transformer.layer_forward and
    layers_forward are replaced, so every model-level forward uses the reference."""
    def keep(h, rows):   # the model's rows= contract: flat rows b*T + t of the full result
        return h if rows is None else h.reshape(-1, h.shape[-1])[rows]

    def layer_forward(i, h, perturb=None, rows=None):   # numpy in, numpy out, as the model's own
        out = layer(net, i, h, perturb)
        return keep(out.numpy() if isinstance(h, np.ndarray) else out, rows)

    def layers_forward(i0, i1, h, perturb=None, rows=None):
        for i in range(i0, i1):
            h = net._run_layer(i, [h], [perturb])[0]
        return keep(h, rows)

    net.layer_forward = layer_forward
    net.layers_forward = layers_forward
    return net
