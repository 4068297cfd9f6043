"""The baseline forwards of benchmarks/forward.py (torch bf16, llama.cpp), each in its own process.

    python benchmarks/baseline_forward.py torch    --threads 2 --batch 16 --seq 32 --repeats 5
    python benchmarks/baseline_forward.py llamacpp --threads 2 --batch 16 --seq 32 --repeats 5

Each prints one JSON line {"engine", "seconds" (best of --repeats after one warm-up), "threads"}
and, with --save-logits F, writes the last-position logits of the first two sequences to F (.npy).
The tokens are the same as forward.py's: batch_tokens(n_vocab, batch, seq) below.

torch: a plain dense nn.Module llama forward in bf16 end to end (weights, activations, SDPA;
RMSNorm statistics in fp32, as Hugging Face's LlamaRMSNorm), on edgetune's dequantized int4
weights, logits at the last position only.  `import torch` comes first, before edgetune (which sets
OMP_WAIT_POLICY=PASSIVE for its own process), and forward.py starts this process without that
variable: torch runs with its default OpenMP settings, torch.set_num_threads(--threads).

llama.cpp: one llama_batch holding all sequences (distinct seq_id, logits requested for each
sequence's last token only), n_batch = n_ubatch >= 512, n_threads = n_threads_batch = --threads,
through llama-cpp-python's low-level API; the KV cache is cleared between runs.
"""
import argparse
import json
import os
import sys
import time

# what libgomp sees when torch loads (edgetune's own import later sets the variable, too late)
OMP_WAIT_POLICY_AT_LOAD = os.environ.get("OMP_WAIT_POLICY")
import torch  # noqa: E402,I001  (before edgetune: libgomp reads its settings when torch loads)
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from tests.reference_forward import torch_rope as rope  # noqa: E402,F401  (fo_baseline uses it too)


def batch_tokens(n_vocab: int, batch: int, seq: int) -> list:
    rng = np.random.default_rng(0)
    return [[int(t) for t in rng.integers(100, n_vocab - 100, seq)] for _ in range(batch)]


def time_calls(fn, n: int) -> float:
    """The best wall time of n calls of fn."""
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    return time_calls(fn, repeats)


def serve(fn, stdin=None, stdout=None) -> float:
    """--serve: time fn on request, so that forward.py can interleave the engines call by call.
    After one warm-up prints {"ready": true}; then each stdin line "time N" runs fn N times and
    prints {"seconds": best of those N}; "done" ends.  Returns the best time seen."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    fn()
    print(json.dumps({"ready": True}), file=stdout, flush=True)
    best = float("inf")
    for line in stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "done":
            break
        if cmd[0] != "time" or len(cmd) != 2 or not cmd[1].isdigit() or int(cmd[1]) < 1:
            raise SystemExit(f"baseline_forward --serve: bad request {line.strip()!r} "
                             f"(expected 'time N' with N >= 1, or 'done')")
        t = time_calls(fn, int(cmd[1]))
        best = min(best, t)
        print(json.dumps({"seconds": t}), file=stdout, flush=True)
    return best


def timer(a):
    """How run_torch / run_llamacpp time their forward: best of --repeats, or served (--serve)."""
    return serve if a.serve else (lambda fn: best_time(fn, a.repeats))


# --- torch bf16 ---------------------------------------------------------------------------------

class DenseLlama(torch.nn.Module):
    """Dense llama-family forward (llama/mistral/qwen2/SmolLM) in one dtype, from a Transformer's
    QTensors dequantized: the bf16 baseline (it was Transformer.to_dense(bf16) in edgetune)."""

    def __init__(self, net, dtype=torch.bfloat16):
        super().__init__()
        from edgetune.quant import dequantize
        self.c = c = net.config
        self.dtype = dtype

        def w(qt):
            return torch.from_numpy(dequantize(qt)).to(dtype)

        def vec(t):   # the model's float32 numpy vectors
            return torch.tensor(np.asarray(t, np.float32)).to(dtype)

        self.embed = w(net.embed)
        self.head_w = self.embed if c.tied_embeddings else w(net.output)
        self.layers = []
        for L in net.layers:
            ws = {n: w(qt) for n, qt in L.w.items()}
            self.layers.append(dict(
                attn_norm=vec(L.attn_norm), ffn_norm=vec(L.ffn_norm),
                qkv=torch.cat([ws["attn_q"], ws["attn_k"], ws["attn_v"]]).contiguous(),
                qkv_b=(torch.cat([vec(L.bias[n]) for n in ("attn_q", "attn_k", "attn_v")])
                       if L.bias else None),
                o=ws["attn_output"], gate_up=torch.cat([ws["ffn_gate"], ws["ffn_up"]]).contiguous(),
                down=ws["ffn_down"]))
        self.output_norm = vec(net.output_norm)
        d = c.rope_dim
        inv = 1.0 / (c.rope_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        if net._rope_factors.get("all") is not None:    # llama3's rope_freqs (numpy)
            inv = inv / torch.from_numpy(net._rope_factors["all"]).double()
        self.inv_freq = inv

    def rms_norm(self, x, w):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.c.rms_eps)
        return w * xf.to(self.dtype)

    def rope(self, x, cos, sin):
        return rope(x, cos, sin, self.c.rope_dim, self.c.rope_mode)

    @torch.inference_mode()
    def last_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids (all sequences T long) -> fp32 logits [B, V] at the last position."""
        c = self.c
        B, T = tokens.shape
        hd, nq, nkv = c.head_dim, c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        h = self.embed[tokens]
        ang = torch.outer(torch.arange(T, dtype=torch.float64) / c.rope_scale, self.inv_freq)
        cos, sin = ang.cos().to(self.dtype), ang.sin().to(self.dtype)
        for L in self.layers:
            x = self.rms_norm(h, L["attn_norm"])
            qkv = x @ L["qkv"].T
            if L["qkv_b"] is not None:
                qkv = qkv + L["qkv_b"]
            q, k, v = qkv.split([nq, nkv, nkv], dim=-1)
            q = self.rope(q.view(B, T, c.n_head, hd).transpose(1, 2), cos, sin)
            k = self.rope(k.view(B, T, c.n_head_kv, hd).transpose(1, 2), cos, sin)
            v = v.view(B, T, c.n_head_kv, hd).transpose(1, 2)
            a = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=c.n_head != c.n_head_kv)
            h = h + a.transpose(1, 2).reshape(B, T, c.n_embd) @ L["o"].T
            x = self.rms_norm(h, L["ffn_norm"])
            g, u = (x @ L["gate_up"].T).split([c.n_ff, c.n_ff], dim=-1)
            h = h + (torch.nn.functional.silu(g) * u) @ L["down"].T
        x = self.rms_norm(h[:, -1], self.output_norm)
        return (x @ self.head_w.T).float()


def run_torch(a, path):
    torch.set_num_threads(a.threads)
    from edgetune.formats.gguf_reader import GGUFFile
    from edgetune.model.transformer import Transformer
    net = Transformer(GGUFFile(path))
    m = DenseLlama(net, torch.bfloat16)
    del net
    batch = batch_tokens(m.c.n_vocab, a.batch, a.seq)
    tokens = torch.tensor(batch, dtype=torch.long)
    t = timer(a)(lambda: m.last_logits(tokens))
    if a.save_logits:
        np.save(a.save_logits, m.last_logits(tokens[:2]).numpy())
    info = {"threads": torch.get_num_threads(), "omp_wait_policy": OMP_WAIT_POLICY_AT_LOAD}
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):   # forward.py's "without AMX" run
        info["onednn_max_cpu_isa"] = os.environ["ONEDNN_MAX_CPU_ISA"]
    return t, info


# --- llama.cpp ----------------------------------------------------------------------------------

def run_llamacpp(a, path):
    import ctypes

    import llama_cpp as L
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise SystemExit(f"{path}: llama.cpp could not load the model")
    ntok = a.batch * a.seq
    cp = L.llama_context_default_params()
    cp.n_ctx = max(512, ntok)
    cp.n_batch = cp.n_ubatch = max(512, ntok)
    cp.n_seq_max = a.batch
    cp.n_threads = cp.n_threads_batch = a.threads
    if hasattr(cp, "kv_unified"):  # one KV stream per sequence (n_ctx / n_seq cells each):
        cp.kv_unified = False      # no token attends over other sequences' cells
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama.cpp could not create a context")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    batch_ids = batch_tokens(n_vocab, a.batch, a.seq)
    b = L.llama_batch_init(ntok, 0, a.batch)
    i = 0
    for s, seq in enumerate(batch_ids):
        for p, tok in enumerate(seq):
            b.token[i] = tok
            b.pos[i] = p
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = s
            b.logits[i] = p == len(seq) - 1
            i += 1
    b.n_tokens = ntok
    mem = L.llama_get_memory(ctx)

    def run():
        L.llama_memory_clear(mem, True)
        rc = L.llama_decode(ctx, b)
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")

    t = timer(a)(run)
    if a.save_logits:
        run()
        rows = []
        for s in range(2):
            ptr = L.llama_get_logits_ith(ctx, (s + 1) * a.seq - 1)
            rows.append(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                              shape=(n_vocab,)).copy())
        np.save(a.save_logits, np.stack(rows))
    L.llama_batch_free(b)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return t, {"threads": a.threads, "n_batch": cp.n_batch, "n_ubatch": cp.n_ubatch,
               "n_seq": a.batch, "kv_unified": bool(getattr(cp, "kv_unified", False))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine", choices=("torch", "llamacpp"))
    ap.add_argument("--model", default=None, help="GGUF path (default: the embedded SmolLM2)")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--save-logits", default=None)
    ap.add_argument("--serve", action="store_true",
                    help="time on request from stdin ('time N' / 'done'; see serve()) instead of "
                         "best of --repeats")
    a = ap.parse_args()
    from edgetune import assets
    path = a.model or assets.default_model_path()
    t, info = (run_torch if a.engine == "torch" else run_llamacpp)(a, path)
    print(json.dumps({"engine": a.engine, "seconds": t, **info}))


if __name__ == "__main__":
    main()
