"""Forward of the other architectures through the one-call C++ block vs the torch op-by-op blocks
they ran before (tests/reference_forward.torch_layer, formerly Transformer._layer_forward_arch).

    python benchmarks/arch_forward.py

Two-layer synthetic Q4_K_M files of the real widths (qwen3-0.6b, gemma3-270m, phi4-mini; vocabulary
1,024), hidden states of a 16 x 32 batch, both paths in this process and interleaved (the machine
may be shared), best of 7 after a warm-up.  Prints each time, the ratio and how far the hidden
states are apart (int8 activation steps differ: ~5e-3); the last line is
`arch_forward: <shape>=<speedup> ...`.
"""
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import numpy as np  # noqa: E402

import edgetune  # noqa: E402
from edgetune.synth import SHAPES, write_synthetic  # noqa: E402
from tests.reference_forward import install  # noqa: E402


def main():
    rng = np.random.default_rng(0)
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in ("qwen3-0.6b", "gemma3-270m", "phi4-mini"):
            s = dataclasses.replace(SHAPES[shape], n_layers=2, vocab=1024)
            p = str(write_synthetic(s, "q4_k_m", os.path.join(tmp, f"{shape}.gguf"), progress=False))
            m, old = edgetune.load(p), edgetune.load(p)
            install(old.net)
            ids = np.array([[1] + [int(t) for t in rng.integers(3, 1000, 31)] for _ in range(16)])
            a, b = np.asarray(m.net.hidden(ids)), np.asarray(old.net.hidden(ids))
            tn, to = [], []
            for _ in range(7):
                t = time.perf_counter()
                m.net.hidden(ids)
                tn.append(time.perf_counter() - t)
                t = time.perf_counter()
                old.net.hidden(ids)
                to.append(time.perf_counter() - t)
            ratios[shape] = min(to) / min(tn)
            print(f"{shape} (2 layers, 16x32): C++ block {min(tn) * 1e3:.1f} ms, torch op-by-op "
                  f"{min(to) * 1e3:.1f} ms, ratio {ratios[shape]:.2f}; hidden states apart "
                  f"{np.linalg.norm(a - b) / np.linalg.norm(b):.1e}", flush=True)
            m.net.close()
            old.net.close()
    print("arch_forward: " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
