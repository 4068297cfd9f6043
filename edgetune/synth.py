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
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgetuneError
from .formats.gguf_writer import GGUFStreamWriter, random_blocks, row_nbytes

QUANTS = ("q4_0", "q4_1", "q8_0")
_FILE_TYPE = {"q4_0": 2, "q4_1": 3, "q8_0": 7}      # gguf.LlamaFileType.MOSTLY_*
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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def tensor_shapes(self) -> list[tuple[str, tuple, bool]]:
        """[(name, numpy shape (N, K) or (n,), is_matrix)] in file order."""
        h, f, kv, v = self.hidden, self.ffn, self.kv_dim, self.vocab
        out = [("token_embd.weight", (v, h), True)]
        for i in range(self.n_layers):
            p = f"blk.{i}."
            out += [(p + "attn_norm.weight", (h,), False),
                    (p + "attn_q.weight", (h, h), True),
                    (p + "attn_k.weight", (kv, h), True),
                    (p + "attn_v.weight", (kv, h), True),
                    (p + "attn_output.weight", (h, h), True),
                    (p + "ffn_norm.weight", (h,), False),
                    (p + "ffn_gate.weight", (f, h), True),
                    (p + "ffn_up.weight", (f, h), True),
                    (p + "ffn_down.weight", (h, f), True)]
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
}


# ---------------------------------------------------------------- tokenizer
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def synthetic_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
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
    pieces = pieces[: n - len(tokens)]
    tokens += pieces
    types += [TOKEN_NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


# ---------------------------------------------------------------- writing
def _resolve(shape: str, quant: str) -> tuple[Shape, str]:
    if shape not in SHAPES:
        raise EdgetuneError(f"unknown shape {shape!r} (choose from: {', '.join(SHAPES)})")
    q = str(quant).lower()
    if q not in QUANTS:
        raise EdgetuneError(f"unknown quant {quant!r} (choose from: {', '.join(QUANTS)})")
    return SHAPES[shape], q


def _add_metadata(w: GGUFStreamWriter, s: Shape, quant: str, seed: int) -> None:
    m = w.meta
    m.add_string("general.name", s.name)
    m.add_string("general.description",
                 f"edgetune synthetic model: random {quant} weights, seed {seed}")
    m.add_uint32("general.file_type", _FILE_TYPE[quant])
    m.add_uint32("general.quantization_version", 2)
    m.add_uint32("llama.vocab_size", s.vocab)
    m.add_uint32("llama.context_length", s.context_length)
    m.add_uint32("llama.embedding_length", s.hidden)
    m.add_uint32("llama.block_count", s.n_layers)
    m.add_uint32("llama.feed_forward_length", s.ffn)
    m.add_uint32("llama.attention.head_count", s.n_heads)
    m.add_uint32("llama.attention.head_count_kv", s.n_kv_heads)
    m.add_uint32("llama.rope.dimension_count", s.head_dim)
    m.add_float32("llama.rope.freq_base", float(s.rope_base))
    m.add_float32("llama.attention.layer_norm_rms_epsilon", float(s.rms_eps))
    tokens, scores, types = synthetic_vocab(s.vocab)
    m.add_string("tokenizer.ggml.model", "llama")
    m.add_array("tokenizer.ggml.tokens", tokens)
    m.add_array("tokenizer.ggml.scores", scores)
    m.add_array("tokenizer.ggml.token_type", types)
    m.add_uint32("tokenizer.ggml.bos_token_id", BOS_ID)
    m.add_uint32("tokenizer.ggml.eos_token_id", EOS_ID)
    m.add_uint32("tokenizer.ggml.unknown_token_id", UNK_ID)
    m.add_bool("tokenizer.ggml.add_bos_token", True)
    m.add_bool("tokenizer.ggml.add_eos_token", False)


def _tensor_chunks(shape: tuple, is_matrix: bool, quant: str, rng: np.random.Generator):
    if not is_matrix:
        v = rng.standard_normal(shape, dtype=np.float32)
        v *= np.float32(0.02)
        v += np.float32(1.0)
        yield v
        return
    n, k = shape
    rows = max(1, CHUNK_BYTES // row_nbytes(quant, k))
    for r0 in range(0, n, rows):
        yield random_blocks(quant, min(rows, n - r0), k, rng, WEIGHT_STD)


def plan_nbytes(shape: str, quant: str) -> int:
    """Bytes of tensor data a synthetic model of this shape/quant has (the file is slightly more)."""
    s, q = _resolve(shape, quant)
    total = 0
    for _, shp, is_matrix in s.tensor_shapes():
        total += (shp[0] * row_nbytes(q, shp[1])) if is_matrix else 4 * shp[0]
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
    out = Path(out)
    if out.is_dir():
        raise EdgetuneError(f"{out}: is a directory; give a file name like {out / (shape + '.gguf')}")
    if out.exists() and not overwrite:
        raise EdgetuneError(f"{out}: already exists (pass --overwrite / overwrite=True to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise EdgetuneError(f"{parent}: output directory does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EdgetuneError(f"{parent}: output directory is not writable")

    tmp = out.with_name(out.name + ".tmp")
    w = None
    try:
        try:
            w = GGUFStreamWriter(tmp, "llama")
            _add_metadata(w, s, q, seed)
            tensors = s.tensor_shapes()
            for name, shp, is_matrix in tensors:
                w.add_tensor_info(name, shp, q if is_matrix else "F32")
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
                w.write_tensor(name, _tensor_chunks(shp, is_matrix, q, rng),
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


# ---------------------------------------------------------------- CLI
def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register the `synth` verb on an argparse subparsers object."""
    shapes_help = "; ".join(
        f"{k}: {v.n_layers} layers, hidden {v.hidden}, ffn {v.ffn}, {v.n_heads}/{v.n_kv_heads} "
        f"heads, vocab {v.vocab}{', tied' if v.tied else ''}" for k, v in SHAPES.items())
    p = subparsers.add_parser(
        "synth", help="write a synthetic GGUF model (real llama shapes, random int4/int8 weights)",
        description="Write a GGUF with the tensor names, shapes, metadata and a synthetic tokenizer "
                    "of a real llama-family model, filled with random quantized weights. llama.cpp "
                    "loads and runs it; use it to measure memory and speed on large shapes. "
                    "Writes in a stream (a 7B file needs little RAM) to OUT.tmp, then renames.")
    p.add_argument("--shape", required=True, choices=list(SHAPES), metavar="SHAPE",
                   help=f"architecture to imitate, one of: {', '.join(SHAPES)} ({shapes_help})")
    p.add_argument("--quant", default="q4_0", choices=list(QUANTS), metavar="QUANT",
                   help="quant type of every matrix incl. token_embd, one of: "
                        f"{', '.join(QUANTS)} (default: %(default)s); norm weights are F32")
    p.add_argument("--out", "-o", required=True, metavar="FILE.gguf",
                   help="output file; its directory must exist")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; same shape/quant/seed give the same file (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace FILE.gguf if it already exists (default: refuse)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="do not show a progress bar")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args) -> int:
    s, q = _resolve(args.shape, args.quant)
    t0 = time.perf_counter()
    path = write_synthetic(args.shape, q, args.out, seed=args.seed, overwrite=args.overwrite,
                           progress=args.progress)
    dt = time.perf_counter() - t0
    size = path.stat().st_size
    print(f"wrote {path}: {args.shape} {q}, {s.n_params() / 1e6:.1f}M parameters, "
          f"{size / 2**20:.1f} MiB in {dt:.1f}s")
    return 0
