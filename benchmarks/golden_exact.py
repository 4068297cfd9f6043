"""Distance of edgetune and llama.cpp from exact math: logits of both runtimes vs a float64 forward
over the same dequantized SmolLM2 weights (tests/reference_forward.to_dense(net, torch.float64): the torch
reference blocks of tests/reference_forward.py), same prompts as
tests/test_golden.py.   python benchmarks/golden_exact.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import edgetune  # noqa: E402  (before torch)
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from edgetune import assets  # noqa: E402
from tests.reference_forward import to_dense  # noqa: E402
from tests.test_golden import PROMPTS  # noqa: E402
f = assets.default_model_path()
m = edgetune.load(f)
ex = edgetune.load(f); to_dense(ex.net, torch.float64)
ll = llama_cpp.Llama(f, logits_all=True, verbose=False, n_ctx=512)
def cos(a, b): return (a*b).sum(-1)/np.linalg.norm(a,axis=-1)/np.linalg.norm(b,axis=-1)
ce, cl, ae, al = [], [], [], []
for p in PROMPTS:
    ids = m.tokenize(p, special=True)
    e = m.logits([ids])[0].astype(np.float64); x = ex.logits([ids])[0].astype(np.float64)
    ll.reset(); ll.eval(ids); l = np.array(ll.scores[:len(ids)], dtype=np.float64)
    ce += list(cos(e, x)); cl += list(cos(l, x)); ae += list(e.argmax(-1) == x.argmax(-1)); al += list(l.argmax(-1) == x.argmax(-1))
ce, cl = np.array(ce), np.array(cl)
print(f"vs exact (fp64 dequantized weights): edgetune top1 {np.mean(ae):.4f} mean_cos {ce.mean():.5f} min_cos {ce.min():.5f} frac<0.999 {(ce<0.999).mean():.3f}")
print(f"vs exact (fp64 dequantized weights): llama.cpp top1 {np.mean(al):.4f} mean_cos {cl.mean():.5f} min_cos {cl.min():.5f} frac<0.999 {(cl<0.999).mean():.3f}")
