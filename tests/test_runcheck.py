"""Nothing lost silently: what a run directory records so that its deltas land on the same weights
anywhere (stored sparse mask, tensor ids, RNG and log version, label rows), and the refusals when
they would not (a changed model load order, RNG or mask; a damaged log; a log with a gap; scales on
unquantized matrices).  edgetune/runlog.py holds the checks."""
import json
import os

import numpy as np
import pytest

import edgetune
from edgetune.config import make_config
from edgetune.errors import EdgetuneError
from edgetune.quant import QTensor, dequantize
from edgetune.train.loop import finetune
from edgetune.train.runstate import apply_run
from edgetune.zo import rng
from edgetune.zo import trainable as trainable_mod
from edgetune.zo.seedlog import encode_record, read_log
from edgetune.zo.trainable import build_trainable
from tests.conftest import make_tiny_task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("runcheck"), 200)


def cfg_for(tiny, out, **kw):
    model, data = tiny
    base = dict(model=model, data=data, verbalizer="a=a,b=b", out=str(out), steps=6, batch=8,
                lr=1e-3, eps=1e-2, eval_every=0, eval_limit=0, test_limit=8, zero_shot=False,
                snapshot_every=5, progress=False, method="scales,norms", schedule="constant",
                estimator="two_point", q=1)
    base.update(kw)
    return make_config(flag_values=base)


def log_lines(run):
    return (run / "seedlog.jsonl").read_bytes().splitlines(keepends=True)


def rewrite_header(run, fn):
    """Edit the seed log's header (re-encoded with a valid CRC: a deliberate change, not damage)."""
    lines = log_lines(run)
    h = json.loads(lines[0])
    h.pop("crc")
    fn(h)
    (run / "seedlog.jsonl").write_bytes(encode_record(h) + b"".join(lines[1:]))


def state_of(ts):
    return {k: v.copy() for k, v in ts.state().items()}


def assert_same_state(a, b):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# --- the sparse mask ---------------------------------------------------------------------------

def test_sparse_mask_is_stored_and_replay_export_and_resume_use_it(tiny, tmp_path, monkeypatch):
    run = tmp_path / "sparse"
    # lr 30: deltas of about a weight's size, so that they survive int4 re-encoding in export
    live = finetune(cfg_for(tiny, run, method="sparse", steps=6, lr=30.0))
    mask = {n: (np.asarray(sp.rows).copy(), np.asarray(sp.cols).copy()) for n, sp in live.trainable.sparse.items()}
    final = state_of(live.trainable)
    assert (run / "mask.npz").exists()
    header, _, _ = read_log(run / "seedlog.jsonl")
    assert header["version"] == 2 and len(header["mask"]["sha256"]) == 64
    with np.load(run / "mask.npz") as z:
        assert sorted(z.files) == sorted([f"rows:{n}" for n in mask] + [f"cols:{n}" for n in mask])

    # another machine whose forward passes rank the weights differently (another CPU, kernel path,
    # thread count): a recomputed mask would choose other weights ...
    def other_norms(net, batches):
        r = np.random.default_rng(1)
        return {qt.name: r.random(qt.shape[1]).astype(np.float32) + 0.5
                for layer in net.layers for qt in layer.w.values()}
    monkeypatch.setattr(trainable_mod, "_input_norms", other_norms)
    m = edgetune.load(tiny[0])
    from edgetune.train.runstate import read_run_log
    from edgetune.runlog import StepBatches, build_set, open_dataset
    from edgetune.train import data as datamod
    cfg = make_config(flag_values=read_run_log(str(run))[0]["config"])
    enc = datamod.encode(open_dataset(cfg), m, max_length=cfg.max_length)
    recomputed = build_set(m, cfg.resolved("classification"), enc, StepBatches(enc, 8, cfg.seed))
    assert any(not np.array_equal(np.asarray(sp.rows), mask[n][0]) for n, sp in recomputed.sparse.items())
    # ... but replay from scratch (no snapshot) uses the stored one: same weights, same state
    os.remove(run / "state.npz")
    ts = apply_run(edgetune.load(tiny[0]), str(run), step="last")
    for n, sp in ts.sparse.items():
        np.testing.assert_array_equal(np.asarray(sp.rows), mask[n][0], err_msg=n)
        np.testing.assert_array_equal(np.asarray(sp.cols), mask[n][1], err_msg=n)
    assert_same_state(state_of(ts), final)
    # export writes the deltas onto the stored weights
    from edgetune.export.gguf_export import export_gguf
    out = export_gguf(run, tmp_path / "sparse.gguf")
    tuned = edgetune.load(str(out))
    base = edgetune.load(tiny[0])
    changed, stored = set(), set()
    for name, (rows, cols) in mask.items():
        i, kind = int(name.split(".")[1]), name.split(".")[2]
        diff = dequantize(tuned.net.layers[i].w[kind]) != dequantize(base.net.layers[i].w[kind])
        changed |= {(name, int(r), int(c) // 32) for r, c in np.argwhere(diff)}
        stored |= {(name, int(r), int(c) // 32) for r, c in zip(rows, cols)}
    assert changed and changed <= stored   # only blocks holding stored-mask weights changed

    # --resume continues on the stored mask as well
    cont = finetune(cfg_for(tiny, run, method="sparse", steps=8, lr=30.0, resume=True))
    for n, sp in cont.trainable.sparse.items():
        np.testing.assert_array_equal(np.asarray(sp.rows), mask[n][0], err_msg=n)
    # a changed or missing mask file is refused, never recomputed
    with np.load(run / "mask.npz") as z:
        arrays = {k: z[k].copy() for k in z.files}
    name = sorted(mask)[0]
    arrays[f"rows:{name}"][0] ^= 1
    np.savez(run / "mask.npz", **arrays)
    with pytest.raises(EdgetuneError, match="mask.npz: checksum .* does not match"):
        apply_run(edgetune.load(tiny[0]), str(run))
    os.remove(run / "mask.npz")
    with pytest.raises(EdgetuneError, match="mask.npz: missing"):
        apply_run(edgetune.load(tiny[0]), str(run))
    with pytest.raises(EdgetuneError, match="mask.npz: missing"):
        finetune(cfg_for(tiny, run, method="sparse", steps=10, lr=30.0, resume=True))


# --- the header: tensor ids, RNG version, log version, label rows --------------------------------

def test_header_records_tensor_ids_and_rng_version_and_mismatches_are_refused(tiny, tmp_path,
                                                                             capfd):
    run = tmp_path / "ids"
    live = finetune(cfg_for(tiny, run, steps=4))
    header, _, _ = read_log(run / "seedlog.jsonl")
    assert header["version"] == 2 and header["rng_version"] == rng.RNG_VERSION
    assert header["tensor_ids"] == {p.name: p.tensor_id for p in live.trainable.params}
    assert header["mask"] is None and header["head_rows"] is None
    final = state_of(live.trainable)

    # a release that loads the model's tensors in another order: the same names, other ids
    m = edgetune.load(tiny[0])
    w = m.net.layers[0].w
    w["attn_q"].tensor_id, w["attn_k"].tensor_id = w["attn_k"].tensor_id, w["attn_q"].tensor_id
    with pytest.raises(EdgetuneError, match=r"tensor ids changed for scales:blk\.0\.attn_k\.weight, "
                                            r"scales:blk\.0\.attn_q\.weight .*another order"):
        apply_run(m, str(run))
    # another RNG definition
    rng_now = rng.RNG_VERSION
    try:
        rng.RNG_VERSION = rng_now + 1
        with pytest.raises(EdgetuneError, match=f"RNG is version {rng_now}, this edgetune's is "
                                                f"version {rng_now + 1}"):
            apply_run(edgetune.load(tiny[0]), str(run))
        with pytest.raises(EdgetuneError, match="different z"):
            finetune(cfg_for(tiny, run, steps=6, resume=True))
    finally:
        rng.RNG_VERSION = rng_now
    # a log from a newer edgetune
    rewrite_header(run, lambda h: h.update(version=3))
    with pytest.raises(EdgetuneError, match="seed log version 3; this edgetune reads versions 1..2"):
        apply_run(edgetune.load(tiny[0]), str(run))
    with pytest.raises(EdgetuneError, match="seed log version 3"):
        finetune(cfg_for(tiny, run, steps=6, resume=True))
    # a version-1 log (written before these fields existed) still replays, with a note
    for k in ("tensor_ids", "rng_version", "mask", "head_rows"):
        rewrite_header(run, lambda h: h.pop(k))
    rewrite_header(run, lambda h: h.update(version=1))
    capfd.readouterr()
    assert_same_state(state_of(apply_run(edgetune.load(tiny[0]), str(run))), final)
    assert "seed log version 1 records no tensor ids or RNG version" in capfd.readouterr().err


def test_head_rows_are_recorded_and_checked(tiny, tmp_path):
    run = tmp_path / "head"
    live = finetune(cfg_for(tiny, run, method="head", steps=3))
    header, _, _ = read_log(run / "seedlog.jsonl")
    assert header["head_rows"] == list(live.trainable.head_rows) and len(header["head_rows"]) == 2
    # a tokenizer that maps the label words elsewhere: the deltas would land on other rows
    rewrite_header(run, lambda h: h.update(head_rows=h["head_rows"][::-1]))
    with pytest.raises(EdgetuneError, match="label words' vocabulary rows were"):
        apply_run(edgetune.load(tiny[0]), str(run))


# --- a damaged log ------------------------------------------------------------------------------

def test_corrupt_record_mid_log_then_resume_is_refused(tiny, tmp_path):
    """A corrupt record in the middle of the log with the snapshot ahead of it: --resume would
    truncate the later valid records and continue from the snapshot, leaving a log that no longer
    replays.  It is refused naming the lost steps, and the log is left as it was."""
    run = tmp_path / "mid"
    finetune(cfg_for(tiny, run, steps=12))            # snapshots at 5, 10 and 12
    lines = log_lines(run)
    assert json.loads(lines[4])["step"] == 3
    bad = bytearray(lines[4])
    bad[len(bad) // 2] ^= 0x01                        # a bad sector in step 3's record
    (run / "seedlog.jsonl").write_bytes(b"".join(lines[:4]) + bytes(bad) + b"".join(lines[5:]))
    before = (run / "seedlog.jsonl").read_bytes()
    with pytest.raises(EdgetuneError, match=r"the record after step 2 is damaged and 8 valid "
                                            r"record\(s\) follow it \(steps 4\.\.11\): steps from 3 "
                                            r"on would be lost"):
        finetune(cfg_for(tiny, run, steps=14, resume=True))
    assert (run / "seedlog.jsonl").read_bytes() == before      # nothing truncated
    with pytest.raises(EdgetuneError, match="steps from 3 on would be lost"):
        apply_run(edgetune.load(tiny[0]), str(run))          # eval --run / export refuse too
    # the records after step 5 lost entirely (no damaged line: e.g. the file restored from an
    # older copy) while state.npz is at step 12
    (run / "seedlog.jsonl").write_bytes(b"".join(lines[:7]))
    with pytest.raises(EdgetuneError, match=r"valid records end at step 6 but the snapshot "
                                            r"\(state\.npz\) is at step 12: steps 6\.\.11 are lost"):
        finetune(cfg_for(tiny, run, steps=14, resume=True))
    with pytest.raises(EdgetuneError, match=r"steps 6\.\.11 are lost"):
        apply_run(edgetune.load(tiny[0]), str(run), step="last")


def test_replay_from_scratch_refuses_a_log_with_a_gap(tiny, tmp_path):
    run = tmp_path / "gap"
    finetune(cfg_for(tiny, run, steps=8))
    lines = log_lines(run)
    assert json.loads(lines[4])["step"] == 3
    (run / "seedlog.jsonl").write_bytes(b"".join(lines[:4] + lines[5:]))   # step 3 missing
    os.remove(run / "state.npz")
    with pytest.raises(EdgetuneError, match=r"gap: steps 3\.\.3 are missing"):
        apply_run(edgetune.load(tiny[0]), str(run), step="last")
    with pytest.raises(EdgetuneError, match=r"gap: steps 3\.\.3 are missing"):
        apply_run(edgetune.load(tiny[0]), str(run), step=6)


# --- scales on unquantized matrices ---------------------------------------------------------------

def test_scales_on_unquantized_layer_matrices_is_refused(tiny):
    """F16/BF16/F32 layer matrices (loaded as kind f32) have no group scales: `--method scales`
    would train nothing on them (with norms: only the norms), silently.  It is refused."""
    m = edgetune.load(tiny[0])
    qt = m.net.layers[1].w["ffn_up"]
    w = dequantize(qt).astype(np.float32)
    m.net.layers[1].w["ffn_up"] = QTensor(qt.name, "f32", w.shape, data=w, tensor_id=qt.tensor_id)
    for methods in ("scales", "scales,norms"):
        with pytest.raises(EdgetuneError, match=r"1 of them are stored unquantized .* e\.g\. "
                                                r"blk\.1\.ffn_up\.weight"):
            build_trainable(m.net, methods)
    build_trainable(m.net, "scales,norms", layers="0")        # block 0 is quantized: fine
    assert len(build_trainable(m.net, "norms,lora").params) > 0
