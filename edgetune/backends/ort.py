"""The onnxruntime backend: every forward pass of a fine-tune run by an onnxruntime session.

    edgetune finetune --backend onnxruntime ...

`OrtModel` offers the forward interface the training loop and the evaluation use
(logits / logits_multi, tokenize, config) on top of the graph that
export/onnx_export.py writes.  The trainable tensors are graph inputs: a perturbed pass feeds
theta + eps*sign*z for each of them (the same z, from the same counter-based RNG, as the native
kernels add on the fly), so the ZO loop, its seed log and its updates are unchanged — the native
model object only holds the parameter arrays and the tokenizer.  This is the path a mobile app
takes: it ships onnxruntime, and ZO needs nothing but inference.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import EdgetuneError

BACKENDS = ("native", "onnxruntime")


def _ort():
    try:
        import onnxruntime
        return onnxruntime
    except ImportError:  # pragma: no cover - installed by make
        raise EdgetuneError("--backend onnxruntime needs the 'onnxruntime' package "
                            "(pip install onnxruntime)") from None


def make_session(onnx_path, threads: int = 0):
    """An onnxruntime CPU session for an edgetune graph (threads 0 = edgetune's kernel threads)."""
    ort = _ort()
    from .. import kernels
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or kernels.get_num_threads() or 0)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # do not spin between runs: the ZO loop does numpy work (perturbations, updates) in between
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise EdgetuneError(f"{onnx_path}: onnxruntime cannot load the graph ({str(e)[:300]})") from None


class OrtModel:
    """Model-like forward (see model/lm.py) computed by onnxruntime.

    model:     the edgetune Model the graph was exported from (tokenizer, padding rules, config)
    trainable: its TrainableSet (the values fed to the graph's trainable inputs), or None
    """

    def __init__(self, model, onnx_path, trainable=None, threads: int = 0):
        self.model = model
        self.config = model.config
        self.tokenizer = model.tokenizer
        self.chat_template = getattr(model, "chat_template", None)
        self.trainable = trainable
        self.path = str(onnx_path)
        self.sess = make_session(onnx_path, threads)
        have = {i.name for i in self.sess.get_inputs()}
        want = {"input_ids", "rows", "vocab"} | {p.name for p in self.params}
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            raise EdgetuneError(f"{onnx_path}: graph inputs do not match this run's trainable set "
                                f"(missing {missing[:3]}, unexpected {extra[:3]})")

    @property
    def params(self):
        return self.trainable.params if self.trainable is not None else []

    @classmethod
    def for_training(cls, model, trainable, onnx_path, threads: int = 0, accuracy_level: int = 0):
        """Export model + trainable set to onnx_path and open a session on it."""
        from ..export.onnx_export import build_onnx
        build_onnx(model.net, trainable, onnx_path, accuracy_level=accuracy_level,
                   doc="edgetune --backend onnxruntime training graph")
        return cls(model, onnx_path, trainable, threads)

    def __repr__(self):
        return f"OrtModel({Path(self.path).name} on {self.model!r})"

    # -- text (the native model's tokenizer) -------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.model.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, ids) -> str:
        return self.model.detokenize(ids)

    # -- forward ---------------------------------------------------------------------------------
    def feeds(self, perturb=None) -> dict:
        """Trainable inputs: each tensor's value, or theta + eps*sign*pscale*z under `perturb`."""
        return {p.name: (p.value if perturb is None else perturb.apply(p)) for p in self.params}

    def _run(self, tokens: np.ndarray, rows: np.ndarray, vocab, perturb) -> np.ndarray:
        V = self.config.n_vocab
        voc = np.arange(V, dtype=np.int64) if vocab is None else np.asarray(vocab, dtype=np.int64)
        feed = {"input_ids": tokens, "rows": rows.astype(np.int64), "vocab": voc}
        feed.update(self.feeds(perturb))
        return self.sess.run(["logits"], feed)[0]

    def logits(self, batch, positions=None, perturb=None, vocab=None) -> np.ndarray:
        tokens, lengths = self.model._pad(batch)
        B, T = tokens.shape
        tok = np.asarray(tokens, np.int64)
        if positions is None:
            rows = np.concatenate([b * T + np.arange(n) for b, n in enumerate(lengths)])
            lg = self._run(tok, rows, vocab, perturb)
            out = np.zeros((B, T, lg.shape[-1]), dtype=np.float32)
            o = 0
            for i, n in enumerate(lengths):
                out[i, :n] = lg[o:o + n]
                o += n
            return out
        pos = np.asarray(self.model._resolve_positions(positions, lengths), dtype=np.int64)
        rows = (np.arange(B)[:, None] * T + pos).reshape(-1)
        lg = self._run(tok, rows, vocab, perturb)
        return lg.reshape(B, pos.shape[1], -1)

    def logits_multi(self, batch, positions, perturbs: list, vocab=None) -> list:
        return [self.logits(batch, positions, p, vocab) for p in perturbs]


def remove_graph(onnx_path):
    """Delete a graph written by build_onnx (the .onnx and its .data)."""
    for p in (Path(onnx_path), Path(str(onnx_path) + ".data")):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
