"""Hugging Face Qwen3ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM (and Llama with llama3 RoPE
scaling) in: edgetune.load(DIR) vs transformers on random-weight directories.

As tests/test_hf.py: the tight reference is the HF model with every weight replaced by the
converted GGUF's dequantized values (gemma's stored 1 + w undone), so the only differences are
edgetune's int8 activations and float order; asserted min cosine >= 0.999, top-1 >= 0.9 over all
positions.  The sequences are longer than gemma's sliding window and phi3 rotates a part of each
head, so those paths are exercised.

    .venv/bin/python -m pytest tests/test_hf_archs.py -x -q -s
"""
import numpy as np
import pytest

import edgetune
from edgetune.formats import hf
from edgetune.formats.gguf_reader import GGUFFile
from edgetune.quant import dequantize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.05, rms_norm_eps=1e-6)
CASES = {
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **COMMON, head_dim=64, tie_word_embeddings=True)),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **dict(COMMON, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1),
        head_dim=64, query_pre_attn_scalar=64, sliding_window=5)),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **COMMON, partial_rotary_factor=0.75, tie_word_embeddings=False, pad_token_id=0)),
    "llama3": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **COMMON, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "cache"))


def _write(d, case):
    torch.manual_seed(1)
    model = CASES[case]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:        # gemma's norms are 1 + w: keep w small for either convention
                p.copy_((0.0 if case == "gemma3" else 1.0) + 0.1 * torch.randn_like(p))
    model.to(torch.float16).save_pretrained(str(d), safe_serialization=True)
    return d


def _dequantized_reference(d, gguf_path, arch):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    g = GGUFFile(gguf_path)
    c = hf.read_config(d)
    sd = model.state_dict()
    with torch.no_grad():
        for hf_name, gg_name, _, _ in hf.expected_tensors(c, "output.weight" in g.tensors):
            hn = hf_name if hf_name in sd else hf_name.replace("model.", "model.language_model.", 1)
            w = dequantize(g.qtensor(gg_name)).reshape(sd[hn].shape)
            if arch == "gemma3" and gg_name.endswith("norm.weight"):
                w = w - 1.0
            if arch == "llama" and ("q_proj" in hf_name or "k_proj" in hf_name):
                n = c.n_heads if "q_proj" in hf_name else c.n_kv_heads
                hd = w.shape[0] // n
                w = w.reshape(n, hd // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            sd[hn].copy_(torch.from_numpy(np.array(w)))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    d = _write(tmp_path / case, case)
    m = edgetune.load(d, progress=False)
    arch = {"llama3": "llama"}.get(case, case)
    assert m.config.arch == arch
    rng = np.random.default_rng(0)
    seqs = [[int(t) for t in rng.integers(0, 256, n)] for n in (23, 9)]
    ours = m.logits(seqs)
    ref = _dequantized_reference(d, m.path, arch)
    cos, top = [], []
    with torch.no_grad():
        for i, s in enumerate(seqs):
            r = ref(torch.tensor([s])).logits[0].numpy().astype(np.float64)
            a = ours[i, :len(s)].astype(np.float64)
            cos += list((a * r).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(r, axis=-1))
            top += list(a.argmax(-1) == r.argmax(-1))
    print(f"{case}: vs transformers on the dequantized weights: min cos {min(cos):.5f} "
          f"top-1 {np.mean(top):.3f} over {len(cos)} positions")
    assert min(cos) >= 0.999 and np.mean(top) >= 0.9, (case, min(cos), np.mean(top))
    if case == "gemma3":
        assert m.config.swa_window == 5 and m.config.swa_layers == (0, 1, 2, 3, 4)
    if case == "phi3":
        assert m.config.rope_dim == 24


def test_unsupported_gemma_attention_scalar_is_refused(tmp_path):
    import json
    d = _write(tmp_path / "g", "gemma3")
    cfg = json.loads((d / "config.json").read_text())
    cfg["query_pre_attn_scalar"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.UnsupportedError, match="query_pre_attn_scalar 99"):
        edgetune.load(d, progress=False)
