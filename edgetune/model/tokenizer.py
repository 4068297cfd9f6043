"""Tokenizer: llama.cpp's own vocabulary code (llama-cpp-python, vocab_only) on the model file."""
from __future__ import annotations

import os
import sys

from ..errors import FormatError


class Tokenizer:
    def __init__(self, path: str):
        try:
            import llama_cpp
        except ImportError as e:  # pragma: no cover - a hard dependency
            raise FormatError(path, f"llama-cpp-python is needed for tokenization ({e})") from None
        self.path = str(path)
        # llama.cpp prints model info on stderr even with verbose=False for some messages
        with _quiet_stderr():
            try:
                self._llm = llama_cpp.Llama(self.path, vocab_only=True, verbose=False)
            except Exception as e:
                raise FormatError(self.path, f"llama.cpp could not read the vocabulary ({e})") from None
        self.bos_id = self._llm.token_bos()
        self.eos_id = self._llm.token_eos()
        self.n_vocab = self._llm.n_vocab()
        eot = self._llm._model.token_eot()
        self.eog_ids = {i for i in (self.eos_id, eot) if i is not None and i >= 0}

    def encode(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids; BOS is added only where the model's metadata asks for it."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def decode(self, ids) -> str:
        return self._llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def piece(self, token_id: int) -> str:
        return self.decode([token_id])

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids


class _quiet_stderr:
    """Silence C-level stderr (llama.cpp's loader chatter) for the duration of a block."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
