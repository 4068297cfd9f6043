"""Hugging Face in: a config.json + *.safetensors directory -> an int4 GGUF, tensor by tensor.

    edgetune convert DIR --out model.gguf [--quant q4_0|q4_1] [--group-size 64]
    edgetune.load("DIR", group_size=64)     # converts once into the cache, then loads the GGUF

Everything else in edgetune (kernels, streaming from flash, training, export) runs on GGUF files,
so a Hugging Face directory is converted into one, the way llama.cpp's convert_hf_to_gguf.py does
it, and then loaded like any GGUF.  `edgetune.load(DIR)` and every `--model DIR` keep the result in
a cache ($EDGETUNE_CACHE, else $XDG_CACHE_HOME/edgetune, else ~/.cache/edgetune) keyed by the
directory's resolved path, each input file's name/size/mtime, the quant type and the group size:
the second load reuses it.  Files are written to a hidden temporary name and renamed when complete,
so an interrupted conversion never leaves a file that looks finished.

Supported: LlamaForCausalLM, MistralForCausalLM (GGUF arch "llama") and Qwen2ForCausalLM ("qwen2",
with q/k/v biases); F32/F16/BF16 tensors; one model.safetensors or shards (with or without
model.safetensors.index.json); RoPE scaling none or linear.

Tensors (names as llama.cpp's converter writes them):
  layer matrices (attn_q/k/v/output, ffn_gate/up/down)  Q4_0 (default) or Q4_1
  token_embd, output (lm_head; absent when tied)        Q8_0: the head's precision matters most
  norms, biases                                         F32
HF llama q_proj/k_proj rows are in the "rotate_half" RoPE order; GGUF llama pairs adjacent
dimensions, so their rows are permuted within each head (as convert_hf_to_gguf.py does; qwen2 GGUFs
keep HF's order and use neox RoPE).

Group size.  GGUF Q4 blocks (and edgetune's and llama.cpp's kernels) are fixed at 32 elements with
one fp16 scale (+ min) each.  group_size G (a multiple of 32 dividing every row length) chooses
over how many elements the quantization statistics are computed: each group of G gets one scale
(Q4_0: its largest-magnitude element / -8; Q4_1: (max - min) / 15 and the min), repeated into its
G/32 blocks.  The file is the same size for every G; a larger G only means coarser statistics
(what a G-group int4 format would store), and the tuned scales of QZO training stay per 32 block.
G=32 is bit-for-bit what ggml's quantize_row_q4_0/q4_1 produce from the same float32 values.

Memory.  Tensors are indexed with the safetensors library, then read through this module's own
read-only mmap of each file in chunks of rows (<= CHUNK_ELEMS float32 values), each chunk's pages
given back with madvise(MADV_DONTNEED) once converted: at no time is more than one chunk of the
fp16 model (plus its float32 copy and quantization temporaries) resident.

Tokenizer: a byte-level BPE tokenizer.json (GPT-2 style: SmolLM2, Qwen2, Llama 3) becomes
tokenizer.ggml.model "gpt2" with its tokens, types and merges, the pre-tokenizer llama.cpp should
use (recognized from tokenizer.json's pre_tokenizer), special token ids, add-BOS flag and chat
template (gguf.SpecialVocab reads those, as convert_hf_to_gguf.py does).  Anything else (no
tokenizer.json, SentencePiece) converts with no vocabulary ("no_vocab"): the model runs on token
ids and Model.tokenize raises an error saying so.

Every problem is a FormatError/UnsupportedError naming the file: missing config.json or
safetensors files, unsupported architecture/activation/RoPE scaling/head_dim, a missing, unexpected
or misshapen tensor, a dtype other than F32/F16/BF16, a truncated or corrupt safetensors file.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgetuneError, FormatError, UnsupportedError
from .gguf_writer import (add_file_type, check_free_space, check_group,
                          check_output, encode_blocks, tensor_nbytes, write_atomic)

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "Gemma3ForCausalLM": "gemma3", "Phi3ForCausalLM": "phi3"}
ACTIVATIONS = {"gemma3": ("gelu_pytorch_tanh", "gelu_tanh")}   # else silu
QUANTS = ("q4_0", "q4_1")
HEAD_QUANT = "Q8_0"
CHUNK_ELEMS = 2 << 20                  # float32 values converted at a time (8 MB)
CONVERTER_VERSION = 2                  # part of the cache key: bump when the output changes
DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}
# files whose content decides the conversion (all *.safetensors too): the cache key covers them
INPUT_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", "chat_template.json", "merges.txt")
LAYER_MATRICES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                  "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                  "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
QKV_BIASES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v"}
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# llama.cpp token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                 r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def is_hf_dir(path) -> bool:
    """A directory with a config.json or *.safetensors files (a Hugging Face model layout)."""
    p = Path(path)
    return p.is_dir() and ((p / "config.json").is_file() or any(p.glob("*.safetensors")))


# ---------------------------------------------------------------------------------------------
# config.json

@dataclass
class HFConfig:
    hf_arch: str
    arch: str                  # GGUF general.architecture
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    vocab: int
    rope_base: float
    rope_linear_factor: float
    rms_eps: float
    context_length: int
    tie_word_embeddings: bool
    qkv_bias: bool
    key_length: int = 0        # head size when it is not hidden / n_heads (qwen3, gemma3)
    rope_dim: int = 0          # phi3 partial_rotary_factor * head size
    swa_window: int = 0        # gemma3 sliding window and the pattern of its layers (n: i % n < n-1)
    swa_pattern: int = 0
    rope_base_swa: float = 0.0
    llama3_rope: tuple = ()    # (factor, low_freq_factor, high_freq_factor, original context)
    longrope: tuple = ()       # phi3: (original context, attn_factor, short factors, long factors)

    @property
    def head_dim(self) -> int:
        return self.key_length or self.hidden // self.n_heads


def read_config(src: Path) -> HFConfig:
    path = src / "config.json"
    if not path.is_file():
        raise FormatError(path, "missing: a Hugging Face model directory needs config.json next "
                                "to its *.safetensors files")
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(path, f"cannot read it as JSON ({e})") from None
    if not isinstance(c, dict):
        raise FormatError(path, "is not a JSON object")
    archs = c.get("architectures") or []
    hf_arch = archs[0] if isinstance(archs, list) and archs else None
    if hf_arch not in ARCHITECTURES:
        raise UnsupportedError(path, f"architecture {hf_arch or c.get('model_type')!r} is not "
                                     f"supported (supported: {', '.join(ARCHITECTURES)})")

    def need(key, default=None):
        v = c.get(key)
        v = default if v is None else v
        if v is None:
            raise FormatError(path, f"missing key {key!r}")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise FormatError(path, f"key {key!r} = {v!r} is not a positive number")
        return v

    arch = ARCHITECTURES[hf_arch]
    hidden, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    n_kv = int(need("num_key_value_heads", n_heads))
    own_head = arch in ("qwen3", "gemma3")      # head_dim is free; llama/qwen2/phi3: hidden/heads
    if (hidden % n_heads and not own_head) or n_heads % n_kv:
        raise FormatError(path, f"hidden_size {hidden}, num_attention_heads {n_heads} and "
                                f"num_key_value_heads {n_kv} do not divide evenly")
    head_dim = int(c.get("head_dim") or hidden // n_heads)
    if head_dim != hidden // n_heads and not own_head:
        raise UnsupportedError(path, f"head_dim {c['head_dim']} != hidden_size / "
                                     f"num_attention_heads = {hidden // n_heads} is not supported "
                                     f"for {hf_arch}")
    act_key = "hidden_activation" if arch == "gemma3" else "hidden_act"
    act = c.get(act_key) or c.get("hidden_act") or ACTIVATIONS.get(arch, ("silu",))[0]
    if act not in ACTIVATIONS.get(arch, ("silu",)):
        raise UnsupportedError(path, f"{act_key} {act!r} is not supported for {hf_arch} "
                                     f"({', '.join(ACTIVATIONS.get(arch, ('silu',)))} only)")
    extra = _arch_extras(path, c, arch, head_dim)
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise UnsupportedError(path, f"{key}: true is not supported for {hf_arch}")
    if c.get("use_sliding_window"):
        raise UnsupportedError(path, "use_sliding_window: true (sliding-window attention) is not "
                                     "supported")
    rope = c.get("rope_parameters") if isinstance(c.get("rope_parameters"), dict) else {}
    scaling = c.get("rope_scaling") or rope       # transformers < 5 | >= 5
    key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    if arch == "gemma3" and isinstance(scaling, dict) and "full_attention" in scaling:
        scaling = scaling["full_attention"]            # transformers 5: per layer type
        rope = dict(rope, rope_theta=scaling.get("rope_theta"))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) \
        else scaling
    factor = 1.0
    if kind == "linear":
        factor = float(scaling.get("factor", 1.0))
    elif kind == "llama3" and arch == "llama":
        extra["llama3_rope"] = (float(scaling["factor"]), float(scaling.get("low_freq_factor", 1.0)),
                                float(scaling.get("high_freq_factor", 4.0)),
                                int(scaling["original_max_position_embeddings"]))
    elif kind in ("longrope", "su") and arch == "phi3":
        extra["longrope"] = _longrope(path, c, scaling, head_dim, extra.get("rope_dim", 0))
    elif kind not in (None, "default"):
        raise UnsupportedError(path, f"{key}: RoPE scaling type {kind!r} is not supported "
                                     f"(supported: none, linear; llama3 for llama; longrope for "
                                     f"phi3)")
    return HFConfig(
        hf_arch=hf_arch, arch=arch, hidden=hidden,
        n_layers=int(need("num_hidden_layers")), n_heads=n_heads, n_kv_heads=n_kv,
        ffn=int(need("intermediate_size")), vocab=int(need("vocab_size")),
        rope_base=float(need("rope_theta", rope.get("rope_theta", 10000.0))),
        rope_linear_factor=factor, rms_eps=float(need("rms_norm_eps", 1e-6)),
        context_length=int(need("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", arch == "gemma3")),
        qkv_bias=arch == "qwen2", key_length=head_dim if head_dim != hidden // n_heads else 0,
        **extra)


def _arch_extras(path, c: dict, arch: str, head_dim: int) -> dict:
    """The HFConfig fields a non-llama architecture adds, checked against what llama.cpp's graph
    computes (model/archs.py)."""
    out = {}
    if arch == "gemma3":
        qs = c.get("query_pre_attn_scalar", head_dim)
        if qs != head_dim:
            raise UnsupportedError(path, f"query_pre_attn_scalar {qs} != head_dim {head_dim}: "
                                         f"llama.cpp scales attention by 1/sqrt(key_length)")
        for k in ("final_logit_softcapping", "attn_logit_softcapping"):
            if c.get(k):
                raise UnsupportedError(path, f"{k} {c[k]} is not supported")
        if c.get("sliding_window"):
            types = c.get("layer_types")
            n = int(c.get("sliding_window_pattern") or 6)
            if types:
                full = [i for i, t in enumerate(types) if t != "sliding_attention"]
                n = full[0] + 1 if full else 0
                if [t != "sliding_attention" for t in types] != \
                        [n != 0 and i % n == n - 1 for i in range(len(types))]:
                    raise UnsupportedError(path, "layer_types is not a periodic sliding/full pattern")
            out.update(swa_window=int(c["sliding_window"]), swa_pattern=n)
            rp = c.get("rope_parameters") or {}
            local = (rp.get("sliding_attention") or {}).get("rope_theta") \
                if isinstance(rp, dict) else None
            out["rope_base_swa"] = float(c.get("rope_local_base_freq") or local or 10000.0)
    if arch == "phi3":
        rp = c.get("rope_parameters") if isinstance(c.get("rope_parameters"), dict) else {}
        f = float(c.get("partial_rotary_factor") or rp.get("partial_rotary_factor") or 1.0)
        if f != 1.0:
            out["rope_dim"] = int(head_dim * f)
    return out


def _longrope(path, c: dict, scaling: dict, head_dim: int, rope_dim: int) -> tuple:
    """(original context, attention factor, short factors, long factors) of phi3's longrope."""
    orig = int(c.get("original_max_position_embeddings")
               or scaling.get("original_max_position_embeddings") or 0)
    n = (rope_dim or head_dim) // 2
    short, long = scaling.get("short_factor"), scaling.get("long_factor")
    if not orig or not isinstance(short, list) or not isinstance(long, list) \
            or len(short) != n or len(long) != n:
        raise FormatError(path, f"longrope needs original_max_position_embeddings and "
                                f"short_factor/long_factor lists of {n} values")
    scale = int(c.get("max_position_embeddings", orig)) / orig
    attn = scaling.get("attention_factor") or \
        (math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
    return orig, float(attn), [float(x) for x in short], [float(x) for x in long]


# ---------------------------------------------------------------------------------------------
# safetensors: index with the library, read through our own map

@dataclass
class SourceTensor:
    name: str
    path: str
    dtype: str                 # F32 | F16 | BF16
    shape: tuple
    offset: int                # absolute byte offset of the data in the file
    nbytes: int


def _safetensors_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(wm.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(index, f"not a valid safetensors index ({e!r})") from None
        for n in names:
            if not isinstance(n, str) or "/" in n or not (src / n).is_file():
                raise FormatError(index, f"names the shard {n!r}, which is not in {src}")
        return [src / n for n in names]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FormatError(src, "no *.safetensors files (edgetune reads safetensors checkpoints "
                               "only, not pytorch_model.bin)")
    return files


def _header(path: Path) -> dict:
    """The safetensors JSON header, checked: every tensor's extent inside the file and its size
    = product(shape) * dtype size (the safetensors library reads the rest the same way)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(path, f"truncated: {size} bytes, no safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100 << 20):
            raise FormatError(path, f"truncated or corrupt: header length {n} does not fit the "
                                    f"{size}-byte file")
        raw = f.read(n)
    try:
        h = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(path, f"corrupt safetensors header ({e})") from None
    if not isinstance(h, dict):
        raise FormatError(path, "corrupt safetensors header (not a JSON object)")
    h.pop("__metadata__", None)
    base = 8 + n
    for name, t in h.items():
        try:
            b, e = (int(x) for x in t["data_offsets"])
            shape = tuple(int(d) for d in t["shape"])
            dtype = str(t["dtype"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(path, f"corrupt safetensors header entry for {name!r}") from None
        if base + e > size or b > e or b < 0:
            raise FormatError(path, f"truncated or corrupt: tensor {name!r} (bytes {base + b}.."
                                    f"{base + e}) extends past the end of the {size}-byte file")
        if dtype in DTYPES and e - b != math.prod(shape) * DTYPES[dtype][1]:
            raise FormatError(path, f"corrupt: tensor {name!r} has {e - b} bytes for shape "
                                    f"{list(shape)} {dtype}")
        t["offset"] = base + b
    return h


def index_safetensors(src: Path) -> dict[str, SourceTensor]:
    """name -> SourceTensor over every file of the checkpoint (validated, nothing read yet)."""
    from safetensors import SafetensorError, safe_open
    out: dict[str, SourceTensor] = {}
    for path in _safetensors_files(src):
        h = _header(path)
        try:
            with safe_open(str(path), framework="numpy") as f:
                keys = list(f.keys())
                info = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                        for k in keys}
        except (SafetensorError, OSError, ValueError) as e:
            raise FormatError(path, f"not a valid safetensors file ({e})") from None
        for k in keys:
            dtype, shape = info[k]
            if k in out:
                raise FormatError(path, f"tensor {k!r} is also in {out[k].path}")
            if k not in h or tuple(h[k]["shape"]) != shape:
                raise FormatError(path, f"corrupt safetensors header entry for {k!r}")
            nbytes = math.prod(shape) * DTYPES.get(dtype, ("", 1))[1]
            out[k] = SourceTensor(k, str(path), dtype, shape, h[k]["offset"], nbytes)
    return out


class _Maps:
    """Read-only mmaps of the checkpoint files; rows come out as float32, their pages are given
    back (madvise DONTNEED) at once, so mapped fp16 pages never pile up in RSS."""

    def __init__(self):
        self._maps: dict[str, mmap.mmap] = {}

    def rows(self, t: SourceTensor, r0: int, r1: int) -> np.ndarray:
        k = t.shape[-1]
        dt, isz = DTYPES[t.dtype]
        start = t.offset + r0 * k * isz
        count = (r1 - r0) * k
        mm = self._maps.get(t.path)
        if mm is None:
            with open(t.path, "rb") as f:
                mm = self._maps[t.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        raw = np.frombuffer(mm, dtype=dt, count=count, offset=start)
        if t.dtype == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.astype(np.float32)
        del raw
        lo = start // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(len(mm), -(-(start + count * isz) // mmap.PAGESIZE) * mmap.PAGESIZE)
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (AttributeError, ValueError, OSError):   # no madvise: pages stay until unmapped
            pass
        return out.reshape(r1 - r0, k)

    def close(self):
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass
        self._maps.clear()


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF llama q/k rows (rotate_half RoPE order) -> GGUF llama order (adjacent pairs), per head;
    w holds whole heads (rows = n_heads * head_dim).  As convert_hf_to_gguf.py's permute()."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# the conversion plan: every GGUF tensor, where it comes from, how it is encoded

@dataclass
class _Item:
    name: str                  # GGUF name
    src: SourceTensor
    qtype: str                 # Q4_0 | Q4_1 | Q8_0 | F32
    shape: tuple
    head_dim: int = 0          # > 0: llama q/k, permute rows within heads of this size
    add_one: bool = False      # gemma RMSNorm weights: GGUF stores 1 + w (as llama.cpp reads them)


@dataclass
class Plan:
    src: Path
    config: HFConfig
    items: list
    quant: str
    group_size: int

    @property
    def out_nbytes(self) -> int:
        return sum(tensor_nbytes(it.qtype, it.shape) for it in self.items)

    @property
    def src_nbytes(self) -> int:
        return sum(it.src.nbytes for it in self.items)


def expected_tensors(c: HFConfig, with_head: bool) -> list[tuple[str, str, tuple, str]]:
    """[(HF name, GGUF name, numpy shape, role)] in GGUF order; role: embed | matrix | vector.
    with_head: lm_head.weight is a tensor of its own (not tied to the embedding)."""
    h, kv, f, v = c.hidden, c.n_kv_heads * c.head_dim, c.ffn, c.vocab
    qd, hd = c.n_heads * c.head_dim, c.head_dim
    shapes = {"attn_q": (qd, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, qd),
              "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}
    out = [("model.embed_tokens.weight", "token_embd.weight", (v, h), "embed")]
    for i in range(c.n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out.append((p + "input_layernorm.weight", b + "attn_norm.weight", (h,), "vector"))
        if c.arch == "phi3":     # fused, in GGUF's order already ([q; k; v], [gate; up])
            out += [(p + "self_attn.qkv_proj.weight", b + "attn_qkv.weight", (qd + 2 * kv, h),
                     "matrix"),
                    (p + "self_attn.o_proj.weight", b + "attn_output.weight", (h, qd), "matrix"),
                    (p + "post_attention_layernorm.weight", b + "ffn_norm.weight", (h,), "vector"),
                    (p + "mlp.gate_up_proj.weight", b + "ffn_up.weight", (2 * f, h), "matrix"),
                    (p + "mlp.down_proj.weight", b + "ffn_down.weight", (h, f), "matrix")]
            continue
        for hf, gg in LAYER_MATRICES.items():
            out.append((p + hf + ".weight", f"blk.{i}.{gg}.weight", shapes[gg], "matrix"))
            if c.qkv_bias and hf in QKV_BIASES:
                out.append((p + hf + ".bias", f"blk.{i}.{gg}.bias", shapes[gg][:1], "vector"))
        if c.arch in ("qwen3", "gemma3"):
            out += [(p + "self_attn.q_norm.weight", b + "attn_q_norm.weight", (hd,), "vector"),
                    (p + "self_attn.k_norm.weight", b + "attn_k_norm.weight", (hd,), "vector")]
        if c.arch == "gemma3":
            out += [(p + "post_attention_layernorm.weight", b + "post_attention_norm.weight",
                     (h,), "vector"),
                    (p + "pre_feedforward_layernorm.weight", b + "ffn_norm.weight", (h,), "vector"),
                    (p + "post_feedforward_layernorm.weight", b + "post_ffw_norm.weight", (h,),
                     "vector")]
        else:
            out.append((p + "post_attention_layernorm.weight", b + "ffn_norm.weight", (h,),
                        "vector"))
    out.append(("model.norm.weight", "output_norm.weight", (h,), "vector"))
    if with_head:
        out.append(("lm_head.weight", "output.weight", (v, h), "embed"))
    return out


def _quant(quant) -> str:
    q = str(quant).lower()
    if q not in QUANTS:
        raise EdgetuneError(f"unknown quant {quant!r} for a Hugging Face conversion (choose from: "
                            f"{', '.join(QUANTS)})")
    return q


def make_plan(src_dir, quant: str = "q4_0", group_size: int = 32) -> Plan:
    """Read config.json and the safetensors headers; check every tensor; decide the GGUF."""
    src = Path(src_dir)
    if not is_hf_dir(src):
        raise FormatError(src, "not a Hugging Face model directory (no config.json and no "
                               "*.safetensors files)")
    quant = _quant(quant)
    c = read_config(src)
    tensors = index_safetensors(src)
    q4 = quant.upper()
    qtypes = {"embed": HEAD_QUANT, "matrix": q4, "vector": "F32"}
    with_head = "lm_head.weight" in tensors and not c.tie_word_embeddings
    want = [(hf, gg, shape, qtypes[role]) for hf, gg, shape, role in expected_tensors(c, with_head)]
    used = {w[0] for w in want} | {"lm_head.weight"}
    for name, t in tensors.items():
        if name not in used and not IGNORED.fullmatch(name):
            raise UnsupportedError(t.path, f"unexpected tensor {name!r}: not a weight of a "
                                           f"{c.hf_arch} with this config.json")
    items = []
    for hf_name, gg_name, shape, qtype in want:
        t = tensors.get(hf_name)
        if t is None:
            raise FormatError(src, f"missing tensor {hf_name!r} (for {gg_name}; config.json: "
                                   f"num_hidden_layers {c.n_layers})")
        if t.dtype not in DTYPES:
            raise UnsupportedError(t.path, f"tensor {hf_name!r} has dtype {t.dtype}; edgetune "
                                           f"converts F32, F16 and BF16 checkpoints (not already "
                                           f"quantized ones)")
        if tuple(t.shape) != shape:
            raise FormatError(t.path, f"tensor {hf_name!r} has shape {list(t.shape)}, config.json "
                                      f"implies {list(shape)}")
        if qtype != "F32":
            try:
                check_group(group_size if qtype == q4 else 32, shape[1], qtype)
            except ValueError as e:
                raise EdgetuneError(f"{src}: cannot quantize {hf_name} ({shape[0]}x{shape[1]}) "
                                    f"to {qtype}: {e} (int4/int8 blocks are 32 wide; group_size "
                                    f"must be a multiple of 32 dividing every row length)") \
                    from None
        permute = c.arch == "llama" and gg_name.endswith(("attn_q.weight", "attn_k.weight"))
        items.append(_Item(gg_name, t, qtype, shape, c.head_dim if permute else 0,
                           c.arch == "gemma3" and gg_name.endswith("norm.weight")))
    return Plan(src, c, items, quant, int(group_size))


def _chunks(plan: Plan, it: _Item, maps: _Maps, on_src_bytes):
    """Encoded bytes (or float32 vectors) of one tensor, in chunks of whole rows (whole heads)."""
    if it.qtype == "F32":
        v = maps.rows(it.src, 0, 1).reshape(-1)
        yield v + np.float32(1.0) if it.add_one else v
        on_src_bytes(it.src.nbytes)
        return
    n, k = it.shape
    rows = max(1, CHUNK_ELEMS // k)
    if it.head_dim:
        rows = max(it.head_dim, rows // it.head_dim * it.head_dim)
    group = plan.group_size if it.qtype != HEAD_QUANT else 32
    row_bytes = it.src.nbytes // n
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = maps.rows(it.src, r0, r1)
        if it.head_dim:
            w = permute_qk(w, (r1 - r0) // it.head_dim)
        yield encode_blocks(w, it.qtype, group)
        del w
        on_src_bytes((r1 - r0) * row_bytes)


# ---------------------------------------------------------------------------------------------
# tokenizer

def _pre_tokenizer(tj: dict):
    """llama.cpp's name for tokenizer.json's pre-tokenizer, or None if not recognized."""
    pt = tj.get("pre_tokenizer") or {}
    items = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    kinds = [p.get("type") for p in items if isinstance(p, dict)]
    if kinds == ["ByteLevel"] and items[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits") \
            and items[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not items[1].get("use_regex", True):
        rx = (items[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(rx)
    return None


def read_bpe_vocab(src: Path, n_vocab: int):
    """(tokens, token types, pre-tokenizer name) of a byte-level BPE tokenizer.json, padded to
    n_vocab with [PAD<i>] tokens; or (None, reason) when there is none edgetune can convert."""
    path = src / "tokenizer.json"
    if not path.is_file():
        return None, f"{src} has no tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model, decoder = tj["model"], tj.get("decoder") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or \
                decoder.get("type") != "ByteLevel":
            return None, (f"{path}: only byte-level BPE tokenizers (GPT-2 style: SmolLM2, Qwen2, "
                          f"Llama 3) are converted, this one is {model.get('type')} with decoder "
                          f"{decoder.get('type')}")
        added = {int(a["id"]): a for a in tj.get("added_tokens") or []}
        rev = {int(i): str(tok) for tok, i in model["vocab"].items()}
        rev.update({i: str(a["content"]) for i, a in added.items()})
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(path, f"not a valid tokenizer.json ({e!r})") from None
    if max(rev, default=0) >= n_vocab:
        raise FormatError(path, f"token id {max(rev)} is outside the model's vocabulary of "
                                f"{n_vocab} (config.json vocab_size)")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(rev[i])
        types.append(NORMAL if i not in added else
                     CONTROL if added[i].get("special") else USER_DEFINED)
    pre = _pre_tokenizer(tj)
    if pre is None:
        print(f"edgetune: warning: {path}: pre-tokenizer not recognized; llama.cpp's 'default' "
              f"is used, so tokenization may differ from Hugging Face's", file=sys.stderr)
        pre = "default"
    return (tokens, types, pre), None


def _add_tokenizer(meta, src: Path, n_vocab: int, say) -> None:
    import gguf
    bpe, reason = read_bpe_vocab(src, n_vocab)
    if bpe is None:
        say(f"edgetune: no tokenizer converted ({reason}); the model runs on token ids")
        meta.add_tokenizer_model("no_vocab")
        meta.add_string("edgetune.no_tokenizer", reason)
    else:
        tokens, types, pre = bpe
        meta.add_tokenizer_model("gpt2")
        meta.add_tokenizer_pre(pre)
        meta.add_token_list(tokens)
        meta.add_token_types(types)
    try:
        special = gguf.SpecialVocab(src, load_merges=bpe is not None, n_vocab=n_vocab)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise FormatError(src / "tokenizer_config.json", f"cannot read the special tokens "
                                                         f"({e!r})") from None
    special.add_to_gguf(meta, quiet=True)


# ---------------------------------------------------------------------------------------------
# conversion

def convert_hf(src_dir, out, quant: str = "q4_0", group_size: int = 32, *,
               overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a Hugging Face directory into an int4 GGUF at `out` (see the module docstring).

    Written to a hidden temporary file next to `out` and renamed when complete; refuses an
    existing `out` unless overwrite=True.  progress: a tqdm bar over the bytes read (stderr)."""
    plan = make_plan(src_dir, quant, group_size)
    out = check_output(out, overwrite)
    check_free_space(out.parent if str(out.parent) else ".", plan.out_nbytes + (16 << 20),
                     out.name)
    say = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)
    c = plan.config
    maps = _Maps()

    def fill(w):
        m = w.meta
        m.add_string("general.name", plan.src.resolve().name)
        m.add_string("general.description",
                     f"converted by edgetune from Hugging Face safetensors ({c.hf_arch}): "
                     f"{plan.quant} matrices with group size {plan.group_size}, Q8_0 "
                     f"embedding/head")
        add_file_type(m, plan.quant)
        _add_hparams(m, c)
        m.add_uint32("edgetune.quant_group_size", plan.group_size)
        _add_tokenizer(m, plan.src, c.vocab, say)
        rope_vecs = _rope_vectors(c)
        for name, v in rope_vecs:
            w.add_tensor_info(name, v.shape, "F32")
        for it in plan.items:
            w.add_tensor_info(it.name, it.shape, it.qtype)
        w.write_head()
        for name, v in rope_vecs:
            w.write_tensor(name, [v])
        from tqdm import tqdm
        with tqdm(total=plan.src_nbytes, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"convert {plan.src.name} {plan.quant} g{plan.group_size}",
                  file=sys.stderr, disable=not progress) as bar:
            for it in plan.items:
                w.write_tensor(it.name, _chunks(plan, it, maps, bar.update))

    try:
        return write_atomic(out, c.arch, fill)
    finally:
        maps.close()


def _add_hparams(m, c: HFConfig) -> None:
    """The `{arch}.*` keys llama.cpp reads, as convert_hf_to_gguf.py writes them."""
    a = c.arch
    m.add_uint32(f"{a}.vocab_size", c.vocab)
    m.add_uint32(f"{a}.context_length", c.context_length)
    m.add_uint32(f"{a}.embedding_length", c.hidden)
    m.add_uint32(f"{a}.block_count", c.n_layers)
    m.add_uint32(f"{a}.feed_forward_length", c.ffn)
    m.add_uint32(f"{a}.attention.head_count", c.n_heads)
    m.add_uint32(f"{a}.attention.head_count_kv", c.n_kv_heads)
    m.add_uint32(f"{a}.rope.dimension_count", c.rope_dim or c.head_dim)
    m.add_float32(f"{a}.rope.freq_base", float(c.rope_base))
    m.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float(c.rms_eps))
    if c.rope_linear_factor != 1.0:
        m.add_string(f"{a}.rope.scaling.type", "linear")
        m.add_float32(f"{a}.rope.scaling.factor", float(c.rope_linear_factor))
    if c.key_length:
        m.add_uint32(f"{a}.attention.key_length", c.key_length)
        m.add_uint32(f"{a}.attention.value_length", c.key_length)
    if c.swa_window:
        m.add_uint32(f"{a}.attention.sliding_window", c.swa_window)
        m.add_float32(f"{a}.rope.freq_base_swa", float(c.rope_base_swa))
        if c.swa_pattern != 6:      # llama.cpp's gemma3 default; other patterns need the key
            m.add_uint32(f"{a}.attention.sliding_window_pattern", c.swa_pattern)
    if c.longrope:
        m.add_uint32(f"{a}.rope.scaling.original_context_length", c.longrope[0])
        m.add_float32(f"{a}.rope.scaling.attn_factor", c.longrope[1])


def _rope_vectors(c: HFConfig) -> list:
    """Per-dimension RoPE frequency divisors written as tensors: llama3's rope_freqs (computed
    from rope_scaling as convert_hf_to_gguf.py does), phi3's longrope short/long factors."""
    d = c.rope_dim or c.head_dim
    if c.llama3_rope:
        factor, low, high, old = c.llama3_rope
        freqs = 1.0 / (c.rope_base ** (np.arange(0, d, 2, dtype=np.float64) / d))
        wl = 2 * np.pi / freqs
        smooth = (old / wl - low) / (high - low)
        f = np.where(wl < old / high, 1.0,
                     np.where(wl > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        return [("rope_freqs.weight", f.astype(np.float32))]
    if c.longrope:
        return [("rope_factors_long.weight", np.asarray(c.longrope[3], np.float32)),
                ("rope_factors_short.weight", np.asarray(c.longrope[2], np.float32))]
    return []


# ---------------------------------------------------------------------------------------------
# the cache behind edgetune.load(DIR) and --model DIR

def cache_dir() -> Path:
    """$EDGETUNE_CACHE, else $XDG_CACHE_HOME/edgetune, else ~/.cache/edgetune."""
    if os.environ.get("EDGETUNE_CACHE"):
        return Path(os.environ["EDGETUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgetune"


def cache_path(src_dir, quant: str = "q4_0", group_size: int = 32) -> Path:
    """Where the conversion of src_dir with these settings lives in the cache.  The name holds a
    hash of the resolved directory path and one of its inputs (name, size, mtime of every file
    the conversion reads), the quant type and the group size."""
    src = Path(src_dir).resolve()
    quant = _quant(quant)
    files = sorted({*(src / n for n in INPUT_FILES if (src / n).is_file()),
                    *src.glob("*.safetensors")})
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    where = hashlib.sha256(str(src).encode()).hexdigest()[:10]
    what = hashlib.sha256(json.dumps([CONVERTER_VERSION, stats]).encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", src.name)[:60] or "model"
    return cache_dir() / f"{stem}-{where}-{quant}-g{int(group_size)}-{what}.gguf"


def cached_conversion(src_dir, quant: str = "q4_0", group_size: int = 32, *,
                      progress: bool = True) -> Path:
    """The int4 GGUF of a Hugging Face directory: reused from the cache, or converted into it
    (older conversions of the same directory with the same settings are then removed)."""
    out = cache_path(src_dir, quant, group_size)
    say = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)
    if out.is_file():
        say(f"edgetune: reusing the cached conversion of {src_dir}: {out}")
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgetuneError(f"{out.parent}: cannot create the conversion cache "
                            f"({e.strerror or e}); set EDGETUNE_CACHE to a writable directory") \
            from None
    say(f"edgetune: converting {src_dir} to {_quant(quant)} (group size {group_size}) into the "
        f"cache: {out}")
    convert_hf(src_dir, out, quant, group_size, overwrite=True, progress=progress)
    prefix = out.name.rsplit("-", 1)[0] + "-"
    for old in out.parent.glob(prefix + "*.gguf"):
        if old != out:
            old.unlink(missing_ok=True)
    return out
