"""Golden test: edgetune's forward on the embedded SmolLM2-135M Q4_1 GGUF vs llama.cpp's logits.

Tolerances.  Both runtimes are approximate: llama.cpp quantizes activations to 8 bits with fp16
block scales and (by default) keeps the KV cache in fp16.  Measured here, llama.cpp disagrees with
*itself* (fp16 vs fp32 KV cache, same file, same prompts) at ~5% of greedy top-1 positions and down
to cosine ~0.993 at single positions.  So the test asserts (a) absolute bounds and (b) that
edgetune is no further from llama.cpp than llama.cpp's own two configurations are from each other
(x1.5 slack), measured in the same run.
"""
import numpy as np
import pytest

PROMPTS = [
    "The capital of France is",
    "Tweet: I love this new phone, the battery lasts forever!\nSentiment (negative, neutral or positive):",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Photosynthesis is the process by which plants",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "In 1969, Neil Armstrong became the first person to",
    "Water boils at a temperature of",
]


def _cos(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _llama_logits(ll, ids):
    ll.reset()
    ll.eval(ids)
    return np.array(ll.scores[: len(ids)], dtype=np.float64)


@pytest.fixture(scope="module")
def compared(smollm2, smollm2_path, llamacpp_smollm2):
    import llama_cpp
    ll_f32kv = llama_cpp.Llama(smollm2_path, logits_all=True, verbose=False, n_ctx=1024,
                               type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache
    batch = [smollm2.tokenize(p, special=True) for p in PROMPTS]
    ours = smollm2.logits(batch)
    cos, agree, self_cos, self_agree = [], [], [], []
    for i, ids in enumerate(batch):
        ref = _llama_logits(llamacpp_smollm2, ids)
        ref2 = _llama_logits(ll_f32kv, ids)
        a = ours[i, : len(ids)].astype(np.float64)
        cos += list(_cos(a, ref))
        agree += list(a.argmax(-1) == ref.argmax(-1))
        self_cos += list(_cos(ref2, ref))
        self_agree += list(ref2.argmax(-1) == ref.argmax(-1))
    return dict(cos=np.array(cos), agree=np.array(agree), self_cos=np.array(self_cos),
                self_agree=np.array(self_agree))


def test_logits_match_llamacpp(compared):
    c = compared
    n = len(c["cos"])
    assert n >= 80
    msg = (f"positions={n} top1={c['agree'].mean():.4f} mean_cos={c['cos'].mean():.5f} "
           f"min_cos={c['cos'].min():.5f} | llama.cpp fp16-KV vs fp32-KV: "
           f"top1={c['self_agree'].mean():.4f} min_cos={c['self_cos'].min():.5f}")
    print(msg)
    assert c["agree"].mean() >= 0.95, msg
    assert c["cos"].mean() >= 0.999, msg
    assert c["cos"].min() >= 0.99, msg
    # no further from llama.cpp than llama.cpp is from itself under another KV-cache type
    dev = 1 - c["cos"]
    self_dev = 1 - c["self_cos"]
    assert dev.mean() <= 1.5 * self_dev.mean() + 1e-5, msg
    assert 1 - c["agree"].mean() <= 1.5 * (1 - c["self_agree"].mean()) + 0.02, msg


def test_greedy_generation_matches_llamacpp(smollm2, llamacpp_smollm2):
    ll = llamacpp_smollm2
    for prompt in ["The capital of France is", "Once upon a time, in a small village by the sea,"]:
        ids = smollm2.tokenize(prompt)
        ours = smollm2.generate_ids(ids, 20, stop_at_eos=False)
        ll.reset()
        ll.eval(ids)
        theirs = []
        for _ in range(20):
            t = int(np.argmax(ll.scores[ll.n_tokens - 1]))
            theirs.append(t)
            ll.eval([t])
        assert ours == theirs, (prompt, smollm2.detokenize(ours), smollm2.detokenize(theirs))


def test_logits_positions_and_padding(smollm2):
    a = smollm2.tokenize("The capital of France is")
    b = smollm2.tokenize("Hello")
    full = smollm2.logits([a, b])
    sel = smollm2.logits([a, b], positions=[-1])
    np.testing.assert_allclose(sel[0, 0], full[0, len(a) - 1], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sel[1, 0], full[1, len(b) - 1], rtol=1e-5, atol=1e-4)
    alone = smollm2.logits([b])
    # a padded batch gives the same logits as the sequence alone (right padding + causal mask)
    np.testing.assert_allclose(full[1, : len(b)], alone[0], rtol=1e-4, atol=1e-3)
    assert np.all(full[1, len(b):] == 0)
    per_seq = smollm2.logits([a, b], positions=[[0, 1], [0, 0]])
    np.testing.assert_allclose(per_seq[0, 1], full[0, 1], rtol=1e-5, atol=1e-4)
    with pytest.raises(Exception, match="out of range"):
        smollm2.logits([b], positions=[5])


def test_cli_generate_matches_llamacpp(smollm2, llamacpp_smollm2, smollm2_path, capsys):
    from edgetune.cli import main
    prompt = "The capital of France is"
    assert main(["generate", "--model", smollm2_path, "--prompt", prompt, "-n", "20", "--ids"]) == 0
    out = capsys.readouterr().out
    ours = [int(t) for t in out.strip().splitlines()[-1].split(":", 1)[1].split()]
    ll = llamacpp_smollm2
    ll.reset()
    ll.eval(smollm2.tokenize(prompt))
    theirs = []
    for _ in range(20):
        t = int(np.argmax(ll.scores[ll.n_tokens - 1]))
        if smollm2.tokenizer.is_eog(t):
            break
        theirs.append(t)
        ll.eval([t])
    assert len(ours) == 20 and ours == theirs
