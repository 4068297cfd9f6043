"""The memory plan: what a run will hold in RAM, checked against --memory before any work starts.

Peak resident memory of a ZO step is predicted as

  runtime      Python + numpy + the C++ extension + the tokenizer (measured constant,
               RUNTIME_BYTES; the training path never imports torch)
  embeddings   token_embd (lookups touch only used rows, but the tied head reads all of it)
  head         output.weight when untied
  scales       fp32 scales (+ mins) of resident layers' matrices and of every trained one
               (QZO); streamed, untrained layers convert theirs from the read buffer per use
  trainable    LoRA A/B, sparse deltas (+ indices), norms, head rows, label bias — only in the
               blocks --layers names
  optimizer    0x (sgd/sign), 1x (momentum) or 2x (adam) the trainable state
  activations  the frozen blocks' output (computed once per step) + the hidden states of the
               perturbed passes that go through a block together (min(P, chunk)) + one layer's
               temporaries + logits
  caches       a frozen body's per-example features (d floats each: train pool, dev, test), or
               the dev split's frozen-block activations (reused by every dev evaluation)
  buffers      two layer-sized read buffers when any layer streams (double buffering)
  layers       the quantized bytes of resident layers (mapped file pages the process touches)

Layers are made resident from the first one on while they fit; the rest stream from the file.
An impossible budget is refused with the smallest budget that would work.
"""
from __future__ import annotations

import math
import re

import numpy as np
from dataclasses import dataclass, field

from ..errors import EdgetuneError

MiB = 1 << 20
GiB = 1 << 30
# measured (SmolLM2, 2026-12-01): python + numpy + edgetune 34 MB, llama.cpp's vocabulary 28 MB,
# a dataset (15 MB for 38k tweets), tqdm/csv/json and the run's small state: ~80 MB
RUNTIME_BYTES = 80 * MiB
# activations: the block arena and its temporaries are what per_pass_layer counts; the kernels'
# int8 activation copies, the numpy inputs/outputs of each call and allocator slack add a third
# (measured on SmolLM2 at batch 8/16/32: 3.0 MB per sequence of 64 tokens vs 2.25 counted)
ACT_OVERHEAD = 1.33
SLACK = 1.05                  # allocator fragmentation, small temporaries


def parse_size(text: str) -> int:
    """'2G', '1.5GB', '800M', '512MiB', plain bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise EdgetuneError(f"--memory: cannot read {text!r} (examples: 2G, 1.5GB, 800M)")
    mult = {"": 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GB" if n >= GiB else f"{n / MiB:.0f} MB"


@dataclass
class Plan:
    budget: int | None
    fixed: dict                     # item -> bytes
    layer_bytes: list               # quantized bytes of each layer
    resident: list                  # layer indices kept in RAM
    streamed: list                  # layer indices read from the file each step
    buffer_bytes: int               # double buffer for streamed layers (0 if none)
    peak: int = 0
    minimum: int = 0
    notes: list = field(default_factory=list)
    step_forwards: float = 0.0      # forwards of the batch per step (the cost model)

    def table(self) -> str:
        rows = [(k, v) for k, v in self.fixed.items()]
        rows.append((f"resident layers ({len(self.resident)})",
                     sum(self.layer_bytes[i] for i in self.resident)))
        rows.append((f"stream buffers ({len(self.streamed)} layers streamed)", self.buffer_bytes))
        w = max(len(k) for k, _ in rows) + 2
        out = ["memory plan", "-" * (w + 12)]
        out += [f"{k:<{w}}{fmt(v):>12}" for k, v in rows]
        out.append("-" * (w + 12))
        out.append(f"{'predicted peak':<{w}}{fmt(self.peak):>12}")
        if self.budget is not None:
            out.append(f"{'budget':<{w}}{fmt(self.budget):>12}")
        out.append(f"{'smallest budget that works':<{w}}{fmt(self.minimum):>12}")
        out += self.notes
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {"budget": self.budget, "fixed": self.fixed, "resident": self.resident,
                "streamed": self.streamed, "buffer_bytes": self.buffer_bytes,
                "predicted_peak": self.peak, "minimum": self.minimum,
                "step_forwards": self.step_forwards}


def _qbytes(rt) -> int:
    """Bytes of a tensor's codes as edgetune holds them: mapped file bytes, except K-quants, whose
    codes are unpacked into RAM (Q4_K: packed nibbles, K/2 per row; Q5_K/Q6_K: one int8 each)."""
    if rt.type_name == "Q4_K":
        return int(np.prod(rt.shape)) // 2
    if rt.type_name in ("Q5_K", "Q6_K"):
        return int(np.prod(rt.shape))
    return int(rt.data.size)


def _scale_bytes(rt) -> int:
    """fp32 scales (+ mins) edgetune keeps for a quantized tensor."""
    if rt.type_name in ("F32", "F16", "BF16") or len(rt.shape) != 2:
        return 0
    n, k = rt.shape
    group = 16 if rt.type_name == "Q6_K" else 32
    with_mins = rt.type_name in ("Q4_1", "Q4_K", "Q5_K")
    return n * (k // group) * 4 * (2 if with_mins else 1)


def make_plan(gguf, budget: int | None, *, batch: int = 16, seq: int = 64,
              method: str = "scales", optimizer: str = "sgd", lora_rank: int = 8,
              lora_targets=("q", "v"), sparse_fraction: float = 1e-3,
              full_vocab_logits: bool = False, layers: str = "all", passes: int = 2,
              chunk: int = 8, n_labels: int = 3, pool: int = 0, eval_examples: int = 1600) -> Plan:
    """Plan resident vs streamed layers for a model file (formats.gguf_reader.GGUFFile).

    layers: the blocks the block methods train (--layers); passes: perturbed passes per step
    (P = q + 1 normalized/one-sided, 2q two-point); pool: training examples whose features a
    frozen body caches (0 = none); eval_examples: dev + test examples scored."""
    from ..model.transformer import ModelConfig
    from ..train.passes import step_cost
    from ..zo.trainable import HEAD_METHODS, LORA_TARGETS, parse_layers
    c = ModelConfig.from_gguf(gguf)
    methods = {m.strip() for m in method.split(",")}
    chosen = set(parse_layers(layers, c.n_layer))
    frozen_body = methods <= set(HEAD_METHODS)
    first = c.n_layer if frozen_body else min(chosen)
    T = gguf.tensors
    layer_q, layer_s = [], []
    for i in range(c.n_layer):
        q = s = 0
        for n in c.layer_weights:
            rt = T[f"blk.{i}.{n}.weight"]
            q += _qbytes(rt)
            s += _scale_bytes(rt)
        for n in ("attn_norm", "ffn_norm") + c.layer_vectors:
            q += _qbytes(T[f"blk.{i}.{n}.weight"])
        layer_q.append(q)
        layer_s.append(s)
    fixed = {"runtime (python, numpy, tokenizer)": RUNTIME_BYTES,
             "embeddings": _qbytes(T["token_embd.weight"]) + _scale_bytes(T["token_embd.weight"])}
    if "output.weight" in T:
        fixed["output head"] = _qbytes(T["output.weight"]) + _scale_bytes(T["output.weight"])
    trainable = 0
    if "lora" in methods:
        from ..zo.trainable import FUSED_TARGETS
        targets = {LORA_TARGETS[t] if LORA_TARGETS[t] in c.layer_weights
                   else FUSED_TARGETS.get(LORA_TARGETS[t]) for t in lora_targets} - {None}
        for i in sorted(chosen):
            for n in targets:
                N, K = T[f"blk.{i}.{n}.weight"].shape
                trainable += lora_rank * (N + K) * 4
    if "sparse" in methods:
        total = sum(math.prod(T[f"blk.{i}.{n}.weight"].shape)
                    for i in sorted(chosen) for n in c.layer_weights)
        trainable += int(total * sparse_fraction) * (4 + 8 + 8)
    if "norms" in methods:
        trainable += (2 * len(chosen) + 1) * c.n_embd * 4
    if "head" in methods:
        trainable += n_labels * c.n_embd * 4
    if "bias" in methods:
        trainable += n_labels * 4
    train_scales = sum(layer_s[i] for i in chosen) if "scales" in methods else 0
    fixed["trainable state"] = trainable
    opt_mult = {"sgd": 0, "sign": 0, "momentum": 1, "adam": 2}.get(optimizer, 2)
    fixed["optimizer state"] = opt_mult * (trainable + train_scales)
    tokens = batch * seq
    d, f = c.n_embd, c.n_ff
    kv = c.n_head_kv * c.head_dim
    per_pass_layer = tokens * (4 * d + 2 * kv + 3 * f) * 4 + batch * c.n_head * seq * seq * 4
    vocab_cols = c.n_vocab if full_vocab_logits else 8
    together = 0 if frozen_body else min(max(passes, 1), chunk)
    fixed[f"activations ({together} passes at a time)"] = int(ACT_OVERHEAD * (
        (1 + together) * tokens * d * 4 + per_pass_layer
        + (max(together, 1) * tokens * vocab_cols * 4) + tokens * d * 2))
    if frozen_body:
        fixed["feature cache (one vector per example)"] = (pool + eval_examples) * d * 4
    elif first > 0:
        dev = min(eval_examples, 400)
        fixed["dev frozen-block activations"] = dev * seq * d * 4
    fixed["scales of trained layers (fp32)"] = train_scales
    base = int(sum(fixed.values()) * SLACK)

    def res_cost(i):  # a resident layer adds its mapped codes (+ its fp32 scales if untrained)
        return layer_q[i] + (0 if ("scales" in methods and i in chosen) else layer_s[i])
    # two read buffers (+ one layer's scales converted per use when scales are not trained)
    buf = 2 * max(layer_q) + (0 if "scales" in methods else max(layer_s))
    all_resident = base + sum(res_cost(i) for i in range(c.n_layer))
    minimum = base + buf
    if budget is None or budget >= all_resident:
        resident, streamed, bufb = list(range(c.n_layer)), [], 0
        peak = all_resident
    else:
        if budget < minimum:
            raise EdgetuneError(f"memory budget {fmt(budget)} is too small for {gguf.path} with "
                                f"batch {batch} x seq {seq}, method {method}: the smallest "
                                f"budget that works is {fmt(minimum)} (all {c.n_layer} layers "
                                f"streamed from the file)")
        room = budget - minimum
        resident = []
        for i in range(c.n_layer):
            if res_cost(i) <= room:
                resident.append(i)
                room -= res_cost(i)
            else:
                break
        streamed = [i for i in range(c.n_layer) if i not in resident]
        bufb = buf
        peak = base + buf + sum(res_cost(i) for i in resident)
    plan = Plan(budget, fixed, layer_q, resident, streamed, bufb, peak, minimum)
    plan.notes.append(f"model: {c.arch} {c.n_layer} layers, d={c.n_embd}; per-layer weights "
                      f"{fmt(max(layer_q))}; batch {batch} x seq {seq}; method {method}")
    plan.step_forwards = 0.0 if frozen_body else step_cost(c.n_layer, first, passes)
    trained = "none (head/bias only)" if frozen_body else (
        f"{first}-{c.n_layer - 1}" if max(chosen) == c.n_layer - 1 else f"{min(chosen)}-{max(chosen)}")
    plan.notes.append(
        f"step cost: trained blocks {trained}, {passes} perturbed passes -> "
        + ("~0 forwards once each example's features are cached (1 forward per new example)"
           if frozen_body else
           f"(n - K + P*K)/n = ({c.n_layer} - {c.n_layer - first} + {passes}*"
           f"{c.n_layer - first})/{c.n_layer} = {plan.step_forwards:.2f} forwards of the batch"))
    return plan
    return plan
