"""The user-facing language model: edgetune.load(path) -> Model with tokenize / logits / generate."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import EdgetuneError, FormatError
from ..formats.gguf_reader import GGUFFile
from .tokenizer import Tokenizer
from .transformer import Transformer


class Model:
    def __init__(self, path, streamed_layers=(), stream_reader=None, source=None):
        self.path = str(path)                 # the GGUF file
        self.source = str(source or path)     # what the user opened (a GGUF, or an HF directory)
        self.gguf = GGUFFile(self.path)
        self.net = Transformer(self.gguf, streamed_layers, stream_reader)
        self.config = self.net.config
        self._tokenizer = None                # llama.cpp's vocabulary, opened on first use
        self.chat_template = self.gguf.get("tokenizer.chat_template")

    def __repr__(self):
        c = self.config
        return (f"Model({Path(self.source).name}: {c.arch}, {c.n_layer} layers, d={c.n_embd}, "
                f"heads {c.n_head}/{c.n_head_kv}, vocab {c.n_vocab})")

    @property
    def has_tokenizer(self) -> bool:
        return self.gguf.get("tokenizer.ggml.model", "no_vocab") not in ("no_vocab", "none")

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if not self.has_tokenizer:
                why = self.gguf.get("edgetune.no_tokenizer", "the file has no vocabulary")
                raise EdgetuneError(f"{self.source}: this model has no tokenizer ({why}); give "
                                    f"it token ids (logits, generate_ids) instead of text")
            self._tokenizer = Tokenizer(self.path)
        return self._tokenizer

    def is_eog(self, token_id: int) -> bool:
        """End of generation: the tokenizer's EOS/EOT, or the metadata's EOS without one."""
        if self.has_tokenizer:
            return self.tokenizer.is_eog(token_id)
        return token_id == self.gguf.get("tokenizer.ggml.eos_token_id", -1)

    # -- text ----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # -- forward -------------------------------------------------------------------------------
    def _pad(self, batch) -> tuple[np.ndarray, list[int]]:
        if len(batch) and isinstance(batch[0], (int, np.integer)):
            batch = [batch]
        if not len(batch) or any(len(s) == 0 for s in batch):
            raise EdgetuneError("logits: every sequence needs at least one token")
        lengths = [len(s) for s in batch]
        T = max(lengths)
        if T > self.config.context_length:
            raise EdgetuneError(f"logits: sequence of {T} tokens exceeds the model's context "
                                f"length {self.config.context_length}")
        tokens = np.zeros((len(batch), T), dtype=np.int64)  # right padding: causal mask suffices
        for i, s in enumerate(batch):
            ids = np.asarray(list(s), dtype=np.int64)
            if ids.min() < 0 or ids.max() >= self.config.n_vocab:
                raise EdgetuneError(f"logits: token id out of range 0..{self.config.n_vocab - 1}")
            tokens[i, : len(s)] = ids
        return tokens, lengths

    @staticmethod
    def _resolve_positions(positions, lengths) -> list[list[int]]:
        B = len(lengths)
        if len(positions) and isinstance(positions[0], (int, np.integer)):
            positions = [list(positions)] * B
        if len(positions) != B:
            raise EdgetuneError(f"logits: got positions for {len(positions)} sequences, batch has {B}")
        out = []
        for p, n in zip(positions, lengths):
            row = [int(x) + n if int(x) < 0 else int(x) for x in p]
            if any(x < 0 or x >= n for x in row):
                raise EdgetuneError(f"logits: position out of range for a sequence of {n} tokens")
            out.append(row)
        if len({len(r) for r in out}) > 1:
            raise EdgetuneError("logits: every sequence needs the same number of positions")
        return out

    def logits(self, batch: Sequence[Sequence[int]], positions=None, perturb=None,
               vocab=None) -> np.ndarray:
        """Logits for a batch of token lists.

        positions=None -> [B, T, V] for every position (padding rows are 0);
        positions=[p, ...] (applied to every sequence) or [[p, ...], ...] per sequence, negative
        counting from each sequence's end (-1 = its last token) -> [B, P, V].  Only the requested
        positions go through the output head.  vocab=[ids] computes only those logits (V=len).
        """
        tokens, lengths = self._pad(batch)
        B, T = tokens.shape
        if positions is not None:   # the last block computes only the rows the head reads
            rows = self._rows(positions, lengths, T)
            h = self.net.hidden(tokens, perturb, rows=rows)
            return self.net.head(h.reshape(B, -1, h.shape[-1]), perturb, vocab)
        # every real position: the padding rows are skipped in the last block too
        rows = np.concatenate([np.arange(n, dtype=np.int64) + i * T for i, n in enumerate(lengths)])
        lg = self.net.head(self.net.hidden(tokens, perturb, rows=rows), perturb, vocab)
        V = lg.shape[-1]
        out = np.zeros((B, T, V), dtype=np.float32)
        o = 0
        for i, n in enumerate(lengths):
            out[i, :n] = lg[o:o + n]
            o += n
        return out

    def _rows(self, positions, lengths, T: int) -> np.ndarray:
        """Flat hidden-state rows b*T + p of the requested positions, [B*P] in (b, p) order."""
        idx = np.asarray(self._resolve_positions(positions, lengths), dtype=np.int64)   # [B, P]
        return (np.arange(len(lengths), dtype=np.int64)[:, None] * T + idx).reshape(-1)

    def logits_multi(self, batch, positions, perturbs: list, vocab=None) -> list:
        """logits() of one batch under several perturbations, computed layer by layer so
        every layer's weights are read once for all of them (ZO2's dual forward)."""
        tokens, lengths = self._pad(batch)
        B, T = tokens.shape
        rows = self._rows(positions, lengths, T)
        out = []
        for h, p in zip(self.net.hidden_multi(tokens, perturbs, rows=rows), perturbs):
            out.append(self.net.head(h.reshape(B, -1, h.shape[-1]), p, vocab))
        return out

    def logits_tensor(self, batch, positions=None, perturb=None, vocab=None):
        """logits() as a torch tensor (imports torch; for callers that compute in torch)."""
        import torch
        return torch.from_numpy(self.logits(batch, positions, perturb, vocab))

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompt, max_tokens: int = 32, stop_at_eos: bool = True) -> str:
        """Greedy continuation of `prompt` (text or token ids); returns the generated text."""
        return self.detokenize(self.generate_ids(prompt, max_tokens, stop_at_eos))

    def generate_ids(self, prompt, max_tokens: int = 32, stop_at_eos: bool = True) -> list[int]:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise EdgetuneError("generate: empty prompt")
        out = []
        for _ in range(max_tokens):  # no KV cache yet: each step re-runs the prefix
            if len(ids) >= self.config.context_length:
                break
            nxt = int(np.argmax(self.logits([ids], positions=[-1])[0, 0]))
            if stop_at_eos and self.is_eog(nxt):
                break
            out.append(nxt)
            ids.append(nxt)
        return out


def load(path, streamed_layers=(), stream_reader=None, *, quant=None, group_size=None,
         progress: bool = True) -> Model:
    """Open a GGUF model file, or a Hugging Face directory (config.json + *.safetensors), for
    inference and training.

    A directory is converted to an int4 GGUF once (quant "q4_0" or "q4_1", statistics per
    group_size elements, default 32; see formats/hf.py) and kept in the cache
    ($EDGETUNE_CACHE or ~/.cache/edgetune); later loads reuse it.  progress: the conversion's
    progress bar and cache messages on stderr.
    streamed_layers: layer indices read from the file per use (two reusable buffers, a prefetch
    thread) instead of staying mapped; see memory/stream.py and `edgetune plan`."""
    p = Path(path)
    if not p.exists():
        raise FormatError(p, "model file not found")
    if p.is_dir():
        from ..formats.hf import cached_conversion
        gguf = cached_conversion(p, quant or "q4_0", group_size or 32, progress=progress)
        return Model(gguf, streamed_layers, stream_reader, source=p)
    if quant is not None or group_size is not None:
        raise EdgetuneError(f"{p}: quant and group_size apply to Hugging Face directories; a GGUF "
                            f"file is loaded as it is quantized")
    return Model(p, streamed_layers, stream_reader)
