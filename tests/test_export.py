"""Export: merged GGUF (scales / lora / sparse / norms) and llama.cpp LoRA adapter, on a tiny
synthetic Q4_1 model; checked against edgetune's in-memory tuned model and llama.cpp.

Tolerances (tiny model, logits of magnitude ~1):
  scales   the exported file differs from the tuned model only by fp16 rounding of the block
           scales (and mins): per block, the exported weights are at least as close to the tuned
           ones as round-to-nearest fp16 scales; logits within 2e-2 of the tuned model.
  lora     merged and re-quantized to Q8_0: logits within 2e-2 of the tuned model (the update
           itself is ~0.1), i.e. far closer to the tuned than to the base model.
  sparse   affected blocks re-encoded: the residual is never larger than dropping the deltas.
  llama.cpp on the exported GGUF vs edgetune on it: cosine >= 0.99 per position.
"""
import os

import numpy as np
import pytest

import edgetune
from edgetune.config import make_config
from edgetune.errors import EdgetuneError
from edgetune.export.gguf_export import (_decode_blocks, export_gguf, export_lora_adapter,
                                         round_scales, _block_fields)
from edgetune.formats.gguf_reader import GGUFFile
from edgetune.train.loop import finetune
from edgetune.train.runstate import apply_run
from tests.conftest import make_tiny_task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    model, data = make_tiny_task(d, 200)
    return d, model, data


def _run(tiny, name, method, lr=1e-3, steps=8):
    d, model, data = tiny
    out = d / name
    if not (out / "seedlog.jsonl").exists():
        finetune(make_config(flag_values=dict(
            model=model, data=data, verbalizer="a=a,b=b", out=str(out), steps=steps, batch=8,
            lr=lr, eps=1e-2, eval_every=0, eval_limit=8, test_limit=8, progress=False,
            method=method, zero_shot=False, estimator="two_point", q=1, schedule="constant")))
    return str(out)


def _ids(m):
    return [m.tokenize("ab cd ef gh aa"), m.tokenize("gh ab bb")]


def _tuned(tiny, run):
    m = edgetune.load(tiny[1])
    ts = apply_run(m, run)     # the best dev step, as export_gguf takes by default
    return m, ts


def _cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_round_scales_compensate_never_worse_than_nearest():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (50, 8, 32)).astype(np.int32)
    d0 = (rng.random((50, 8)) * 0.01 + 0.002).astype(np.float16).astype(np.float32)
    m0 = (-7.5 * d0).astype(np.float16).astype(np.float32)
    s = (d0 * (1 + rng.standard_normal(d0.shape) * 3e-4)).astype(np.float32)
    target = s[..., None] * q + m0[..., None]
    err = {}
    for mode in ("nearest", "compensate"):
        d1, m1 = round_scales("Q4_1", q, s, m0, mode)
        assert np.all(d1.astype(np.float16).astype(np.float32) == d1)   # on the fp16 grid
        assert np.all(m1.astype(np.float16).astype(np.float32) == m1)
        err[mode] = ((d1[..., None] * q + m1[..., None] - target) ** 2).sum(-1)
    assert np.all(err["compensate"] <= err["nearest"] * (1 + 1e-9) + 1e-30)
    assert err["compensate"].sum() < err["nearest"].sum()


def test_scales_export_matches_tuned_and_keeps_bytes(tiny, tmp_path):
    run = _run(tiny, "r_scales", "scales")
    m, ts = _tuned(tiny, run)
    out = export_gguf(run, tmp_path / "s.gguf")
    src, exp = GGUFFile(tiny[1]), GGUFFile(out)
    # metadata: every source key kept (name suffixed), provenance added
    for k in src.metadata:
        assert k in exp.metadata, k
        if k != "general.name":
            assert exp.metadata[k] == src.metadata[k], k
    assert "edgetune" in exp.metadata["general.name"]
    assert exp.metadata["edgetune.methods"] == "scales"
    assert list(exp.tensors) == list(src.tensors)
    for name, rt in src.tensors.items():
        et = exp.tensors[name]
        assert et.type_name == rt.type_name and et.shape == rt.shape
        if name not in ts.scales:                       # untouched: byte-identical
            assert np.array_equal(np.asarray(et.data), np.asarray(rt.data)), name
            continue
        n, k = rt.shape
        a = np.asarray(rt.data).reshape(n, k // 32, 20)
        b = np.asarray(et.data).reshape(n, k // 32, 20)
        assert np.array_equal(a[..., 4:], b[..., 4:]), name   # integer codes unchanged
        # per block: at least as close to the tuned weights as round-to-nearest fp16 scales
        _, m0, q = _block_fields("Q4_1", a)
        s = ts.scales[name].value
        tuned = s[..., None] * q + m0[..., None]
        near = s.astype(np.float16).astype(np.float32)[..., None] * q + m0[..., None]
        e_exp = ((_decode_blocks("Q4_1", b) - tuned) ** 2).sum(-1)
        e_near = ((near - tuned) ** 2).sum(-1)
        assert np.all(e_exp <= e_near * (1 + 1e-5) + 1e-12), name
    me = edgetune.load(out)
    ids = _ids(m)
    lt, le = m.logits(ids), me.logits(ids)
    assert np.abs(le - lt).max() < 2e-2


def test_lora_merge_sparse_norms(tiny, tmp_path):
    # LoRA merged into Q8_0 matrices
    run = _run(tiny, "r_lora", "lora", lr=3.0)
    m, ts = _tuned(tiny, run)
    base = edgetune.load(tiny[1])
    ids = _ids(m)
    lt, lb = m.logits(ids), base.logits(ids)
    out = export_gguf(run, tmp_path / "l.gguf")
    exp = GGUFFile(out)
    for name in ts.lora:
        assert exp.tensors[name].type_name == "Q8_0"
    le = edgetune.load(out).logits(ids)
    upd = np.abs(lt - lb).max()
    assert upd > 2e-2
    assert np.abs(le - lt).max() < 2e-2
    assert np.abs(le - lt).max() < 0.25 * upd
    # sparse + norms: norms exact, sparse residual never worse than dropping the deltas
    run2 = _run(tiny, "r_sparse", "sparse,norms", lr=1e-2)
    m2, ts2 = _tuned(tiny, run2)
    rep = {}
    out2 = export_gguf(run2, tmp_path / "sn.gguf", report=rep)
    g2, src = GGUFFile(out2), GGUFFile(tiny[1])
    for name, (p, _) in ts2.norms.items():
        assert g2.tensors[name].type_name == "F32"
        np.testing.assert_array_equal(g2.qtensor(name).data.reshape(-1), p.value.reshape(-1))
    sb = rep["sparse_blocks"]
    assert sb["delta2"] > 0 and sb["res2_after"] <= sb["res2_before"]
    for name, sp in ts2.sparse.items():              # only affected blocks changed
        n, k = src.tensors[name].shape
        a = np.asarray(src.tensors[name].data).reshape(n, k // 32, 20)
        b = np.asarray(g2.tensors[name].data).reshape(n, k // 32, 20)
        changed = np.argwhere(np.any(a != b, axis=-1))
        hit = set(zip(np.asarray(sp.rows).tolist(), (np.asarray(sp.cols) // 32).tolist()))
        assert all((int(r), int(c)) in hit for r, c in changed), name
    le2 = edgetune.load(out2).logits(ids)
    assert np.abs(le2 - m2.logits(ids)).max() < 2e-2


def _llama(path, **kw):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), logits_all=True, verbose=False, n_ctx=64, seed=0, **kw)


def _ll_logits(ll, ids):
    ll.reset()
    ll.eval(ids)
    return np.array(ll.scores[: len(ids)], dtype=np.float64)


def test_llamacpp_runs_exported_gguf(tiny, tmp_path):
    run = _run(tiny, "r_scales", "scales")
    out = export_gguf(run, tmp_path / "s.gguf")
    me = edgetune.load(out)
    ll = _llama(out)
    for ids in _ids(me):
        e = me.logits([ids])[0]
        lg = _ll_logits(ll, ids)
        assert min(_cos(e[i], lg[i]) for i in range(len(ids))) >= 0.99


def test_lora_adapter_loads_in_llamacpp(tiny, tmp_path):
    run = _run(tiny, "r_lora", "lora", lr=3.0)
    m, ts = _tuned(tiny, run)
    ad = export_lora_adapter(run, tmp_path / "ad.gguf")
    g = GGUFFile(ad)
    assert g.metadata["general.type"] == "adapter" and g.metadata["adapter.type"] == "lora"
    assert g.metadata["general.architecture"] == "llama"
    assert abs(g.metadata["adapter.lora.alpha"] - 16.0) < 1e-6
    for name, lo in ts.lora.items():
        assert g.tensors[f"{name}.lora_a"].shape == lo.a.value.shape   # [r, K]
        assert g.tensors[f"{name}.lora_b"].shape == lo.b.value.shape   # [N, r]
    base = edgetune.load(tiny[1])
    ll, ll0 = _llama(tiny[1], lora_path=str(ad)), _llama(tiny[1])
    for ids in _ids(m):
        lt, lb = m.logits([ids])[0], base.logits([ids])[0]
        la, l0 = _ll_logits(ll, ids), _ll_logits(ll0, ids)
        assert np.abs(la - lt).max() < 2e-2
        assert _cos(la - l0, lt - lb) > 0.98          # llama.cpp applies the same update


def test_refusals(tiny, tmp_path):
    run = _run(tiny, "r_scales", "scales")
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(EdgetuneError, match="exists"):
        export_gguf(run, out)
    assert out.read_bytes() == b"keep"
    export_gguf(run, out, overwrite=True)
    assert GGUFFile(out).metadata["edgetune.methods"] == "scales"
    with pytest.raises(EdgetuneError, match="not found"):
        export_gguf(tmp_path / "nope", tmp_path / "y.gguf")
    with pytest.raises(EdgetuneError, match="no LoRA.*--format gguf"):
        export_lora_adapter(run, tmp_path / "z.gguf")
    mixed = _run(tiny, "r_mixed", "lora,norms", steps=2)
    with pytest.raises(EdgetuneError, match="norms"):
        export_lora_adapter(mixed, tmp_path / "z.gguf")
    with pytest.raises(EdgetuneError, match="does not exist"):
        export_gguf(run, tmp_path / "no" / "dir" / "y.gguf")
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]   # no partial files left


def test_cli_export(tiny, tmp_path, capsys):
    from edgetune.cli import main
    run = _run(tiny, "r_lora", "lora", lr=3.0)
    out = tmp_path / "cli.gguf"
    assert main(["export", "--run", run, "--format", "gguf-lora", "--out", str(out)]) == 0
    assert out.exists()
    assert main(["export", "--run", run, "--format", "gguf-lora", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--run", run, "--out", str(out), "--overwrite"]) == 0
    assert GGUFFile(out).metadata["edgetune.export"] == "gguf"
