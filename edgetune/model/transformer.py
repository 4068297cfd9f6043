"""Forward-only transformer (llama, mistral, qwen2, SmolLM, llama 3.x, qwen3, gemma3, phi3) on QTensors.

What each architecture adds to the llama block is in model/archs.py; every block runs in C++, one
call per block range (kernels.block_forward: the layers and the trainable set's values handed over
as data).  The torch op-by-op reference it is tested against lives in tests/reference_forward.py.

No autograd: every matmul with a weight goes through kernels.qgemm, which can perturb a tensor's
group scales on the fly (ZO training).  Activations are float32 numpy arrays (torch is not
imported on the C++ path).  Sequences in a
batch are right-padded, so the causal mask alone keeps padding out of every real position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import kernels
from ..errors import FormatError, UnsupportedError
from ..formats.gguf_reader import GGUFFile
from ..quant import QTensor, dequantize_rows, slice_rows
from .archs import ARCHS, BLOCK_ARCHS, LLAMA_WEIGHTS, layer_vectors, layer_weights, swa_layers

# architectures whose GGUF layout we implement, with their RoPE pairing convention
ARCHITECTURES = {a: spec.rope_mode for a, spec in ARCHS.items()}
LAYER_WEIGHTS = LLAMA_WEIGHTS   # the llama-family layout; config.layer_weights is the model's own


@dataclass
class ModelConfig:
    arch: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    rope_base: float
    rope_dim: int
    rope_mode: str            # "normal": rotate (x[2i], x[2i+1]); "neox": rotate (x[i], x[i+d/2])
    rope_scale: float = 1.0   # linear position scaling
    rms_eps: float = 1e-5
    context_length: int = 2048
    tied_embeddings: bool = False
    qkv_bias: bool = False
    key_length: int = 0       # attention.key_length: head size when n_head * head size != n_embd
    swa_window: int = 0       # sliding-window layers see the last swa_window positions (incl. own)
    swa_layers: tuple = ()
    rope_base_swa: float = 0.0
    attn_scale: float = 0.0   # 0: 1/sqrt(head_dim)
    rope_attn_factor: float = 1.0   # multiplies cos/sin (phi3 longrope)
    rope_orig_context: int = 0      # phi3: longer contexts use rope_factors_long

    @property
    def head_dim(self) -> int:
        return self.key_length or self.n_embd // self.n_head

    @property
    def spec(self):
        return ARCHS[self.arch]

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def layer_weights(self) -> tuple:
        return layer_weights(self.arch)

    @property
    def layer_vectors(self) -> tuple:
        return layer_vectors(self.arch)

    @property
    def plain_block(self) -> bool:
        """A plain llama block (what the ONNX builder writes); the C++ block runs every arch."""
        return self.arch in BLOCK_ARCHS and self.q_dim == self.n_embd

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> "ModelConfig":
        arch = g.require("general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedError(g.path, f"architecture {arch!r} is not supported "
                                           f"(supported: {', '.join(ARCHITECTURES)})")
        a = arch

        def key(k, default=None):
            v = g.get(f"{a}.{k}", default)
            if v is None:
                raise FormatError(g.path, f"missing metadata key '{a}.{k}'")
            return v

        n_embd = int(key("embedding_length"))
        n_head = int(key("attention.head_count"))
        emb = g.tensors.get("token_embd.weight")
        if emb is None:
            raise FormatError(g.path, "missing tensor 'token_embd.weight'")
        n_vocab = int(g.get(f"{a}.vocab_size", emb.shape[0]))
        scaling = g.get(f"{a}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise UnsupportedError(g.path, f"RoPE scaling {scaling!r} is not supported (none, linear)")
        factor = float(g.get(f"{a}.rope.scaling.factor", 1.0) or 1.0) if scaling == "linear" else 1.0
        n_layer = int(key("block_count"))
        key_length = int(g.get(f"{a}.attention.key_length", 0) or 0)
        vlen = int(g.get(f"{a}.attention.value_length", key_length) or 0)
        if key_length and vlen != key_length:
            raise UnsupportedError(g.path, f"attention.key_length {key_length} != value_length {vlen}")
        rope_base = float(g.get(f"{a}.rope.freq_base", 10000.0))
        swa = swa_layers(g, a, n_layer)
        return cls(
            arch=arch, n_embd=n_embd, n_layer=int(key("block_count")), n_head=n_head,
            n_head_kv=int(g.get(f"{a}.attention.head_count_kv", n_head)),
            n_ff=int(key("feed_forward_length")), n_vocab=n_vocab,
            rope_base=rope_base,
            rope_dim=int(g.get(f"{a}.rope.dimension_count", key_length or n_embd // n_head)),
            rope_mode=ARCHITECTURES[arch], rope_scale=factor,
            rms_eps=float(g.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            context_length=int(g.get(f"{a}.context_length", 2048)),
            tied_embeddings="output.weight" not in g.tensors,
            qkv_bias="blk.0.attn_q.bias" in g.tensors,
            key_length=key_length if key_length != n_embd // n_head else 0,
            swa_window=int(g.get(f"{a}.attention.sliding_window", 0) or 0) if swa else 0,
            swa_layers=swa,
            rope_base_swa=float(g.get(f"{a}.rope.freq_base_swa", ARCHS[a].rope_base_swa or rope_base)),
            rope_attn_factor=float(g.get(f"{a}.rope.scaling.attn_factor", 1.0) or 1.0),
            rope_orig_context=int(g.get(f"{a}.rope.scaling.original_context_length", 0) or 0),
        )


@dataclass
class Layer:
    attn_norm: np.ndarray                     # float32 vectors
    ffn_norm: np.ndarray
    w: dict                                   # name in config.layer_weights -> QTensor
    bias: dict = field(default_factory=dict)  # "attn_q"/"attn_k"/"attn_v" -> vector (qwen2)
    norms: dict = field(default_factory=dict)  # config.layer_vectors -> vector (q/k/post norms)


def _drop_pages(g: GGUFFile, offset: int, nbytes: int) -> None:
    """madvise(DONTNEED) the file pages [offset, offset+nbytes) of g's map: clean file pages
    leave this process's RSS (the page cache keeps them)."""
    import mmap
    mm = getattr(getattr(g, "_mm", None), "_mmap", None)
    if mm is None or nbytes <= 0:
        return
    page = mmap.PAGESIZE
    lo = (offset // page) * page
    hi = min(len(mm), ((offset + nbytes + page - 1) // page) * page)
    try:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (ValueError, OSError):
        pass


class NoHooks:
    """Default training hooks: nothing trainable, nothing perturbed (see zo/trainable.py)."""

    def scale_perturbation(self, qt, pert):
        return None

    def linear_extra(self, qt, x, y, pert):
        return y

    def norm_weight(self, name, w, pert):
        return w

    def linear_terms(self, qt, pert):
        return None


class Transformer:
    """Weights + forward.  `perturb` is an opaque per-pass object handed to `self.hooks`, which a
    trainable set (zo/trainable.py) implements: the model itself knows nothing about training."""

    def __init__(self, g: GGUFFile, streamed_layers=(), stream_reader=None):
        """streamed_layers: layer indices whose codes are read from the file per use into two
        reusable buffers (memory/stream.py) instead of staying mapped; their scales stay here."""
        self.path = g.path
        self.hooks = NoHooks()
        self.stream = None
        self.config = c = ModelConfig.from_gguf(g)
        self.tensor_names = []  # stable order: the tensor_id of a QTensor is its index here
        self._prepacked_ranges = []  # file byte ranges of prepacked matrices (_q_resident)
        self.embed = self._q(g, "token_embd.weight")
        self.layers = []
        to_stream = sorted(set(int(i) for i in streamed_layers))
        for i in range(c.n_layer):
            if i in to_stream:  # no scales yet: converted per use, or kept if trained
                w = {n: self._q_shell(g, f"blk.{i}.{n}.weight") for n in c.layer_weights}
            else:
                w = {n: self._q_resident(g, f"blk.{i}.{n}.weight") for n in c.layer_weights}
            bias = {}
            if c.qkv_bias:
                for n in ("attn_q", "attn_k", "attn_v"):
                    bias[n] = self._vec(g, f"blk.{i}.{n}.bias")
            norms = {n: self._vec(g, f"blk.{i}.{n}.weight") for n in c.layer_vectors}
            self.layers.append(Layer(self._vec(g, f"blk.{i}.attn_norm.weight"),
                                     self._vec(g, f"blk.{i}.ffn_norm.weight"), w, bias, norms))
            self._drop_prepacked(g)
        if to_stream:
            self._setup_stream(g, to_stream, stream_reader)
        self.output_norm = self._vec(g, "output_norm.weight")
        self.output = self.embed if c.tied_embeddings else self._q_resident(g, "output.weight")
        self._drop_prepacked(g)
        self._check_shapes()
        self._rope_cache = {}
        # per-dimension frequency divisors: llama3's rope_freqs, phi3's short/long factors
        self._rope_factors = {}
        for key, name in (("all", "rope_freqs.weight"), ("short", "rope_factors_short.weight"),
                          ("long", "rope_factors_long.weight")):
            if name in g.tensors:
                f = np.array(g.qtensor(name).data, np.float32).reshape(-1)
                if f.size != c.rope_dim // 2:
                    raise FormatError(self.path, f"tensor {name!r} has {f.size} values, expected "
                                                 f"{c.rope_dim // 2} (rope dimension / 2)")
                self._rope_factors[key] = f

    # -- loading -------------------------------------------------------------------------------
    def _q(self, g: GGUFFile, name: str) -> QTensor:
        qt = g.qtensor(name, tensor_id=len(self.tensor_names))
        self.tensor_names.append(name)
        return qt

    def _q_resident(self, g: GGUFFile, name: str) -> QTensor:
        """A resident matrix: q4 codes prepacked for this CPU's kernels (kernels.prepack) when its
        best path reads them; the mapped file pages then leave RSS (export and the other paths
        still read `codes`, which maps them in again), so the weights are counted once."""
        qt = self._q(g, name)
        if kernels.prepack(qt):
            rt = g.tensors[name]
            self._prepacked_ranges.append((rt.offset, int(rt.data.nbytes)))
            _drop_pages(g, rt.offset, int(rt.data.nbytes))
        return qt

    def _drop_prepacked(self, g: GGUFFile) -> None:
        """Drop every prepacked matrix's file pages again: reading the next tensors maps some of
        them back in (the kernel maps the page-cache neighbours of a faulting page, whole large
        folios at a time; measured: 37 MB of SmolLM2's 66 MB of matrices were mapped again by
        the end of the load when each was dropped only once)."""
        for off, n in self._prepacked_ranges:
            _drop_pages(g, off, n)

    def _q_shell(self, g: GGUFFile, name: str) -> QTensor:
        """A streamed layer's QTensor without codes or scales: its kind/group/offset come from
        converting one row (one page touched, then given back)."""
        from ..formats.gguf_reader import RawTensor, to_qtensor
        rt = g.tensors[name]
        one = to_qtensor(RawTensor(rt.name, rt.type_name, (1,) + tuple(rt.shape[1:]),
                                   rt.data[:1], rt.offset), self.path, len(self.tensor_names))
        _drop_pages(g, rt.offset, int(rt.data.shape[1]))
        self.tensor_names.append(name)
        one.shape = tuple(rt.shape)
        one.codes = one.scales = one.mins = None
        one.meta["scales_per_use"] = True
        return one

    def keep_scales(self, qt: QTensor):
        """Give a streamed QTensor persistent fp32 scales (it is trained): read its bytes once."""
        if not qt.meta.get("scales_per_use"):
            return
        if self.stream is None:
            raise FormatError(self.path, f"{qt.name}: no stream to read scales from")
        fresh = self.stream.read_tensor(qt.name, qt.tensor_id)
        qt.scales = np.ascontiguousarray(fresh.scales, dtype=np.float32).copy()
        qt.mins = None if fresh.mins is None else np.ascontiguousarray(fresh.mins).copy()
        qt.meta["scales_per_use"] = False

    def _setup_stream(self, g: GGUFFile, layers, reader):
        """Drop streamed layers' mapped codes (keeping scales) and start the prefetch thread."""
        from ..memory.stream import LayerStreamer
        spec = {}
        for i in layers:
            if not 0 <= i < self.config.n_layer:
                raise FormatError(self.path, f"cannot stream layer {i}: the model has "
                                             f"{self.config.n_layer} layers")
            ts = []
            for n in self.config.layer_weights:
                rt = g.tensors[f"blk.{i}.{n}.weight"]
                ts.append((rt.name, rt.type_name, rt.shape, rt.offset, int(rt.data.size)))
            spec[i] = ts
        self.stream = LayerStreamer(self.path, spec, reader=reader)
        self.streamed = set(layers)

    def _vec(self, g: GGUFFile, name: str) -> np.ndarray:
        qt = g.qtensor(name)
        return np.array(qt.data, dtype=np.float32).reshape(-1)

    def _check_shapes(self):
        c = self.config
        kv, qd, d = c.kv_dim, c.q_dim, c.n_embd
        if c.spec.fused:
            want = {"attn_qkv": (qd + 2 * kv, d), "attn_output": (d, qd),
                    "ffn_up": (2 * c.n_ff, d), "ffn_down": (d, c.n_ff)}
        else:
            want = {"attn_q": (qd, d), "attn_k": (kv, d), "attn_v": (kv, d),
                    "attn_output": (d, qd), "ffn_gate": (c.n_ff, d),
                    "ffn_up": (c.n_ff, d), "ffn_down": (d, c.n_ff)}
        vec = {"attn_q_norm": c.head_dim, "attn_k_norm": c.head_dim,
               "post_attention_norm": d, "post_ffw_norm": d}
        for i, layer in enumerate(self.layers):
            for n, shape in want.items():
                if tuple(layer.w[n].shape) != shape:
                    raise FormatError(self.path, f"tensor 'blk.{i}.{n}.weight' has shape "
                                                 f"{tuple(layer.w[n].shape)}, expected {shape}")
            for n, t in layer.norms.items():
                if t.size != vec[n]:
                    raise FormatError(self.path, f"tensor 'blk.{i}.{n}.weight' has {t.size} "
                                                 f"values, expected {vec[n]}")
        if tuple(self.embed.shape) != (c.n_vocab, c.n_embd):
            raise FormatError(self.path, f"token_embd.weight has shape {tuple(self.embed.shape)}, "
                                         f"expected {(c.n_vocab, c.n_embd)}")

    def qtensors(self) -> dict:
        """name -> QTensor for every matrix (the embedding/head included once)."""
        out = {"token_embd.weight": self.embed}
        for i, layer in enumerate(self.layers):
            for n, qt in layer.w.items():
                out[f"blk.{i}.{n}.weight"] = qt
        if not self.config.tied_embeddings:
            out["output.weight"] = self.output
        return out

    # -- pieces --------------------------------------------------------------------------------
    def rms_norm(self, x, weight) -> np.ndarray:
        """x * rsqrt(mean(x^2) + eps) * weight over the last axis (float32 arrays)."""
        eps = self.config.rms_eps
        x = np.asarray(x, np.float32)
        w = np.asarray(weight, np.float32)
        if kernels.HAVE_KERNELS:
            return kernels.rms_norm(x, w, eps)
        var = np.mean(np.square(x), -1, keepdims=True, dtype=np.float32)
        return x * (np.float32(1.0) / np.sqrt(var + np.float32(eps))) * w

    def rope(self, T: int, layer: int | None = None):
        """cos/sin tables [T, rope_dim/2] for positions 0..T-1 (of `layer`: sliding-window layers
        may have their own base, and their linear scaling does not apply, as in llama.cpp)."""
        c = self.config
        swa = layer is not None and layer in c.swa_layers
        key = (T, swa)
        if key not in self._rope_cache:
            d = c.rope_dim
            base = c.rope_base_swa if swa else c.rope_base
            inv = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
            f = self._rope_factors.get("all")
            if "short" in self._rope_factors:   # phi3: long factors past the original context
                long = c.rope_orig_context and T > c.rope_orig_context and "long" in self._rope_factors
                f = self._rope_factors["long" if long else "short"]
            if f is not None:
                inv = inv / f.astype(np.float64)
            pos = np.arange(T, dtype=np.float64) / (1.0 if swa else c.rope_scale)
            ang = np.outer(pos, inv)
            m = c.rope_attn_factor
            self._rope_cache[key] = ((np.cos(ang) * m).astype(np.float32),
                                     (np.sin(ang) * m).astype(np.float32))
        return self._rope_cache[key]

    def linear(self, x, qt: QTensor, perturb=None) -> np.ndarray:
        """x [..., K] times qt^T (the output head's full-vocabulary logits), with the hooks' scale
        perturbation and extra terms."""
        shp = x.shape
        x2 = np.ascontiguousarray(np.asarray(x, np.float32).reshape(-1, shp[-1]))
        y = kernels.qgemm(x2, qt, perturb=self.hooks.scale_perturbation(qt, perturb))
        y = self.hooks.linear_extra(qt, x2, y, perturb)
        return y.reshape(*shp[:-1], qt.shape[0])

    def norm(self, x, name: str, weight, perturb=None):
        return self.rms_norm(x, self.hooks.norm_weight(name, weight, perturb))

    def embed_tokens(self, tokens) -> np.ndarray:
        """Token ids [B, T] (any integer array) -> embedding rows [B, T, n_embd] float32."""
        tokens = np.asarray(tokens, dtype=np.int64)
        rows = dequantize_rows(self.embed, tokens.reshape(-1))
        if self.config.spec.embed_scale:    # gemma: embeddings * sqrt(n_embd), in float32
            rows *= np.float32(math.sqrt(self.config.n_embd))
        return rows.reshape(*tokens.shape, self.config.n_embd)

    def layer_forward(self, i: int, h, perturb=None, rows=None):
        """One transformer block on hidden states h [B, T, n_embd] (float32 array): one C++ call
        (kernels.block_forward).  rows: see layers_forward."""
        return self._blocks(i, i + 1, h, perturb, rows)

    def block_config(self) -> tuple:
        """The model's shape as kernels.block_forward's cfg tuple."""
        c = self.config
        return (c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_ff, c.rope_dim,
                c.rope_mode == "neox", c.rms_eps, c.attn_scale or 1.0 / math.sqrt(c.head_dim),
                1 if c.spec.act == "gelu_tanh" else 0)

    def block_layer(self, i: int, perturb=None, T: int | None = None) -> tuple:
        """Layer i under `perturb` as data for the C++ block (kernels.block_layer): its matrices
        (fused ones in the q and up places) with their scale perturbations, and the hooks' norm
        weights, biases and per-matrix LinearTerms (LoRA, sparse deltas) as perturbed for this
        pass.  T: the sequence length, for a sliding-window layer's own RoPE tables."""
        c, L, hk = self.config, self.layers[i], self.hooks
        terms_of = getattr(hk, "linear_terms", None)
        if terms_of is None:
            raise TypeError(f"{type(hk).__name__}: the model's hooks must describe what they add to "
                            f"a matrix as data (linear_terms): the forward runs in C++")
        if c.spec.fused:
            mats = [L.w["attn_qkv"], None, None, L.w["attn_output"], None, L.w["ffn_up"],
                    L.w["ffn_down"]]
        else:
            mats = [L.w[n] for n in LLAMA_WEIGHTS]
        for qt in mats:
            if qt is not None and qt.kind != "f32" and (qt.codes is None or qt.scales is None):
                raise FormatError(self.path, f"{qt.name} is not resident: a streamed layer runs "
                                             f"between stream.acquire and release (_run_layer)")
        terms = [None if qt is None else terms_of(qt, perturb) for qt in mats]
        bad = [qt.name for qt, t in zip(mats, terms) if t is NotImplemented]
        if bad:
            raise TypeError(f"{type(hk).__name__}.linear_terms cannot describe {bad[0]} as data")

        def nw(name, v):
            return hk.norm_weight(f"blk.{i}.{name}", v, perturb)
        biases = None
        if L.bias:
            biases = tuple(nw(f"{n}.bias", L.bias[n]) for n in ("attn_q", "attn_k", "attn_v"))
        head_norms = post_norms = None
        if c.spec.qk_norm:
            head_norms = (nw("attn_q_norm.weight", L.norms["attn_q_norm"]),
                          nw("attn_k_norm.weight", L.norms["attn_k_norm"]))
        if c.spec.post_norms:
            post_norms = (nw("post_attention_norm.weight", L.norms["post_attention_norm"]),
                          nw("post_ffw_norm.weight", L.norms["post_ffw_norm"]))
        swa = i in c.swa_layers
        return kernels.block_layer(
            mats, [None if qt is None else hk.scale_perturbation(qt, perturb) for qt in mats],
            nw("attn_norm.weight", L.attn_norm), nw("ffn_norm.weight", L.ffn_norm), biases, terms,
            head_norms, post_norms, c.swa_window if swa else 0,
            self.rope(T, i) if swa and T is not None else None)

    def layers_forward(self, i0: int, i1: int, h, perturb=None, rows=None):
        """Layers i0..i1-1 on h [B, T, n_embd]: one C++ call for the whole range when every layer
        is resident, else layer by layer (a streamed layer is read in for its call).

        rows: None -> [B, T, n_embd]; or flat row indices b*T + t of the only states the caller
        reads -> just those, [len(rows), n_embd] (bit-identical to the same rows of the full
        result): the last layer skips the others after its attention (kernels.block_forward's
        keep_rows)."""
        if i1 <= i0:
            return h if rows is None else h.reshape(-1, h.shape[-1])[rows]
        if self.stream is not None and any(i in self.streamed for i in range(i0, i1)):
            for i in range(i0, i1):
                h = self._run_layer(i, [h], [perturb], rows if i == i1 - 1 else None)[0]
            return h
        return self._blocks(i0, i1, h, perturb, rows)

    def _blocks(self, i0: int, i1: int, h, perturb, rows=None):
        """Layers i0..i1-1 (resident) on h [B, T, n_embd] in one kernels.block_forward call."""
        B, T, D = h.shape
        cos, sin = self.rope(T)
        layers = [self.block_layer(i, perturb, T) for i in range(i0, i1)]
        out = kernels.block_forward(h.reshape(B * T, D), self.block_config(), layers, B, T, cos, sin,
                                    keep_rows=rows)
        return out.reshape(B, T, D) if rows is None else out

    def final_norm(self, h, perturb=None) -> np.ndarray:
        return self.norm(h, "output_norm.weight", self.output_norm, perturb)

    def head(self, h, perturb=None, rows=None) -> np.ndarray:
        """Final norm + output projection for selected hidden states [..., n_embd] -> logits.

        rows: optional vocabulary ids; only those logits are computed (e.g. a classifier's
        label words), in fp32 from the dequantized rows (a few rows: no int8 activations).
        """
        x = self.final_norm(h, perturb)
        if rows is None:
            lg = self.linear(x, self.output, perturb)
            extra = getattr(self.hooks, "vocab_logits_delta", None)
            return lg if extra is None else extra(x, lg, perturb)
        return self.label_logits(x, rows, [perturb])[0]

    def label_logits(self, x, rows, perturbs) -> np.ndarray:
        """Logits of vocabulary `rows` from final normed states x [..., d], one [..., R] tensor
        per perturbation (a trainable head/bias on those rows is applied, vectorised)."""
        shp = x.shape
        x2 = np.asarray(x, np.float32).reshape(-1, shp[-1])
        base = x2 @ self.output_rows_f32(rows).T
        fn = getattr(self.hooks, "label_logits", None)
        if fn is None:
            out = np.repeat(base[None], len(perturbs), axis=0)
        else:
            out = fn(x2, base, perturbs, rows)
        return np.ascontiguousarray(out, np.float32).reshape(len(perturbs), *shp[:-1],
                                                                   len(rows))

    def output_rows_f32(self, rows) -> np.ndarray:
        key = ("f32",) + tuple(int(r) for r in rows)
        cache = self.__dict__.setdefault("_row_cache", {})
        if key not in cache:
            cache[key] = dequantize_rows(self.output, np.asarray(key[1:], dtype=np.int64))
        return cache[key]

    def output_rows(self, rows) -> QTensor:
        key = tuple(int(r) for r in rows)
        cache = self.__dict__.setdefault("_row_cache", {})
        if key not in cache:
            cache[key] = slice_rows(self.output, np.asarray(key, dtype=np.int64))
        return cache[key]

    def _layer_qtensors(self, i: int) -> dict:
        return {qt.name: qt for qt in self.layers[i].w.values()}

    def _run_layer(self, i: int, hs: list, perturbs: list, rows=None) -> list:
        """Layer i on one or more hidden states, each under its own perturbation, while the
        layer's weights are resident (a streamed layer is read once for all of them).  rows: as
        in layers_forward (for the last layer of a range)."""
        streamed = self.stream is not None and i in self.streamed
        if streamed:
            self.stream.acquire(i, self._layer_qtensors(i))
        try:
            return [self.layer_forward(i, h, p, rows) for h, p in zip(hs, perturbs)]
        finally:
            if streamed:
                self.stream.release(i, self._layer_qtensors(i))

    def hidden(self, tokens, perturb=None, rows=None) -> np.ndarray:
        """Final hidden states [B, T, n_embd], or only flat rows b*T + t of them (layers_forward)."""
        return self.hidden_multi(tokens, [perturb], rows=rows)[0]

    def hidden_upto(self, tokens, end: int) -> np.ndarray:
        """Unperturbed hidden states after blocks 0..end-1 (the frozen prefix of a step)."""
        return self.layers_forward(0, end, self.embed_tokens(tokens), None)

    def hidden_from(self, h, start: int, perturbs: list, rows=None) -> list:
        """Blocks start..n-1 on the same input h under several perturbations, layer by layer
        (ZO2 generalised to any number of passes): each block's weights are read once for all
        of them.  Before the first perturbation-dependent block the passes are identical and
        run once.  rows: only those flat rows b*T + t of each result (layers_forward)."""
        n = self.config.n_layer
        if len(perturbs) == 1:      # one pass: the whole range in one C++ call when resident
            return [self.layers_forward(start, n, h, perturbs[0], rows)]
        if start >= n:
            return [self.layers_forward(start, n, h, None, rows)] * len(perturbs)
        hs = [h] * len(perturbs)
        for i in range(start, n):
            hs = self._run_layer(i, hs, perturbs, rows if i == n - 1 else None)
        return hs

    def hidden_multi(self, tokens, perturbs: list, frozen_below: int = 0, rows=None) -> list:
        """Hidden states of the same tokens under several perturbations: blocks below
        `frozen_below` once, unperturbed; the rest layer by layer for every perturbation.
        rows: only those flat rows b*T + t of each result (layers_forward)."""
        return self.hidden_from(self.hidden_upto(tokens, frozen_below), frozen_below, perturbs,
                                rows)

    def close(self):
        if self.stream is not None:
            self.stream.close()
            self.stream = None
