"""The run directory's files, each absent or complete at every instant, and the healing `--resume` does.

A run can be SIGKILLed at any point, including its start-up (model load, dataset tokenization,
zero-shot eval) and its end (final eval, summary, plot).  So:
- whole-file outputs (config.json, summary.json, metrics.png) are written by `atomic_file`: a
  temporary file, fsync, rename over the target, fsync of the directory;
- metrics.csv is created with its header by an atomic write, and each row is appended with one
  write() + fsync, so a kill leaves either the row or nothing; `MetricsCSV` heals on resume what
  another writer or a power loss could leave (no header, a torn last line, rows past the log);
- what a killed run never saved is recomputed on resume: the zero-shot figure (measured on the
  untuned state, before the resume loads any snapshot — `needs_zero_shot`) and the dev evaluation
  of the step the run was killed at (`MetricsCSV.last_step`);
- `--resume` of a directory the run created but logged nothing in (killed before its first seed-log
  record), or before it made the directory, starts it from step 0 (`resume_point`).
The seed log (zo/seedlog.py) and state.npz (loop.save_snapshot) keep their own guarantees.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from contextlib import contextmanager

from .. import faults
from ..errors import EdgetuneError
from ..zo.seedlog import read_log

METRICS_COLUMNS = ("step", "loss", "lr", "dev_acc", "rss_mb", "elapsed_s", "tokens_per_s",
                   "dev_nll")
# files a run writes; a directory holding only these (and temporaries) is one this run may reuse
RUN_FILES = ("config.json", "seedlog.jsonl", "state.npz", "best.npz", "metrics.csv",
             "metrics.png", "summary.json", "model.onnx", "model.onnx.data", "mask.npz")
TMP_SUFFIX = ".tmp"


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (the directory entry, not only the file's data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str, mode: str = "wb"):
    """Write `path` whole or not at all: yields a file on `path.tmp`; on success it is fsync'd and
    renamed over `path`; on an exception it is removed and `path` is untouched.
    Crash tests: EDGETUNE_FAULT=rename-<file name>:N kills just before the Nth such rename."""
    path = str(path)
    tmp = path + TMP_SUFFIX
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    faults.reached("rename-" + os.path.basename(path))
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path: str, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def run_config(cfg) -> dict:
    """The configuration a run records (config.json, the seed log header): what the run is, not
    how this process was started — so a run resumed after a kill records what an uninterrupted
    one does (and exports byte-identically)."""
    return dict(cfg.to_dict(), resume=False, overwrite=False)


def resume_point(out: str) -> bool:
    """For --resume: True when `out` holds a seed log with a valid header (continue it); False when
    the run was killed before logging anything (start it from step 0 in the same directory, made
    here if the run was killed before it made it).
    Stale temporaries of interrupted atomic writes are removed."""
    if not os.path.isdir(out):   # killed before it made its directory (e.g. while importing)
        print(f"{out}: no such run directory: starting the run from step 0", file=sys.stderr,
              flush=True)
        try:
            os.makedirs(out)
        except OSError as e:
            raise EdgetuneError(f"{out}: cannot create the run directory ({e.strerror})") from None
        return False
    names = os.listdir(out)
    foreign = sorted(n for n in names if n not in RUN_FILES and not n.endswith(TMP_SUFFIX))
    if "seedlog.jsonl" not in names and foreign:
        raise EdgetuneError(f"{out}: nothing to resume (no seedlog.jsonl) and not a run directory "
                            f"(it holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})")
    for n in names:
        if n.endswith(TMP_SUFFIX) and n[:-len(TMP_SUFFIX)] in RUN_FILES:
            os.remove(os.path.join(out, n))
    header, _, _ = read_log(os.path.join(out, "seedlog.jsonl"))
    if header is None:
        print(f"{out}: the run was stopped before its first logged record; starting it from step 0",
              file=sys.stderr, flush=True)
    return header is not None


def read_summary(path: str) -> dict:
    """summary.json of an earlier process of this run, or {} — also when it is unreadable (only a
    pre-atomic version could leave it torn): every figure in it is recomputed or re-read."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            s = json.load(f)
        if isinstance(s, dict):
            return s
        problem = "not a JSON object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = str(e)
    print(f"{path}: unreadable ({problem}); it will be rewritten", file=sys.stderr, flush=True)
    return {}


def needs_zero_shot(cfg, task: str, prev_summary: dict) -> bool:
    """Whether this process must measure the zero-shot accuracy: asked for, a classification task,
    and not already saved by an earlier process of the run (one killed before saving it)."""
    return bool(cfg.zero_shot and task == "classification"
                and prev_summary.get("zero_shot_test_acc") is None)


def loss_ema(records) -> float | None:
    """The training-loss EMA (as metrics.csv reports it) after the logged steps, so a resumed run
    continues the curve an uninterrupted one draws."""
    ema = None
    for rec in records:
        if rec.get("type") == "step":
            ema = rec["loss"] if ema is None else 0.9 * ema + 0.1 * rec["loss"]
    return ema


def _valid_row(fields) -> bool:
    if len(fields) not in (len(METRICS_COLUMNS), len(METRICS_COLUMNS) - 1):  # or pre-dev_nll
        return False
    try:
        if int(fields[0]) < 0:
            return False
        for v in fields[1:]:
            if v != "":
                float(v)
    except ValueError:
        return False
    return True


def read_metrics(path: str) -> list[dict]:
    """The complete, well-formed rows of a metrics.csv as {column: string}, in file order.
    Tolerant by design (plots and resumes must not fail on it): the header may be missing, a torn
    last line (no newline) and malformed rows are skipped."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")[:-1]   # the part after the last newline is torn (or empty)
    rows = []
    for i, line in enumerate(lines):
        text = line.decode("utf-8", errors="replace").rstrip("\r")
        fields = next(csv.reader([text]), [])
        if i == 0 and tuple(fields) in (METRICS_COLUMNS, METRICS_COLUMNS[:-1]):
            continue
        if _valid_row(fields):
            rows.append(dict(zip(METRICS_COLUMNS, fields + [""] * (len(METRICS_COLUMNS) - len(fields)))))
    return rows


def _csv_line(values) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


class MetricsCSV:
    """metrics.csv, valid at every instant: header written atomically with the file, rows appended
    whole.  Opening an existing file keeps its valid rows up to `upto_step` (the steps the seed log
    holds) and rewrites it atomically if anything else was there (missing header, torn or
    malformed lines, rows the log does not reach)."""

    def __init__(self, path: str, upto_step: int):
        self.path = str(path)
        self.rows = [r for r in read_metrics(self.path) if int(r["step"]) <= upto_step]
        text = _csv_line(METRICS_COLUMNS) + "".join(
            _csv_line([r[c] for c in METRICS_COLUMNS]) for r in self.rows)
        old = None
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                old = f.read()
        if old != text.encode("utf-8"):
            if old:
                print(f"{self.path}: repaired (header, torn or stray lines); kept "
                      f"{len(self.rows)} rows", file=sys.stderr, flush=True)
            atomic_write_text(self.path, text)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def last_step(self) -> int:
        return int(self.rows[-1]["step"]) if self.rows else 0

    def dev_curve(self) -> list:
        """[(step, dev score)] of every evaluation in the file (including earlier processes'):
        the dev accuracy, or minus the dev NLL for a language-model run."""
        out = []
        for r in self.rows:
            if r.get("dev_acc"):
                out.append((int(r["step"]), float(r["dev_acc"])))
            elif r.get("dev_nll"):
                out.append((int(r["step"]), -float(r["dev_nll"])))
        return out

    def append(self, values) -> None:
        """One row, in one write(): a kill leaves the whole row or none of it."""
        values = [str(v) for v in values]
        if len(values) != len(METRICS_COLUMNS):
            raise ValueError(f"metrics row needs {len(METRICS_COLUMNS)} values, got {len(values)}")
        data = _csv_line(values).encode("utf-8")
        while data:   # a short row goes in one write(); loop only for partial writes
            data = data[os.write(self._fd, data):]
        os.fsync(self._fd)
        self.rows.append(dict(zip(METRICS_COLUMNS, values)))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
