"""Shared fixtures: the embedded SmolLM2 model (edgetune and llama.cpp views of the same file)."""
import os

import pytest

LONG = os.environ.get("EDGETUNE_LONG") == "1"


@pytest.fixture(scope="session")
def smollm2_path():
    from edgetune import assets
    return assets.default_model_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    import edgetune
    return edgetune.load(smollm2_path)


@pytest.fixture(scope="session")
def llamacpp_smollm2(smollm2_path):
    import llama_cpp
    return llama_cpp.Llama(smollm2_path, logits_all=True, verbose=False, n_ctx=1024, n_batch=1024,
                           seed=0)


def make_tiny_task(d, n_rows: int):
    """A tiny synthetic Q4_1 model + a JSONL classification task ("a"/"b", verbalizer a=a,b=b)."""
    import json
    import random
    from edgetune.synth import write_synthetic
    model = write_synthetic("tiny", "q4_1", d / "tiny.gguf", seed=3, progress=False)
    r = random.Random(0)
    rows = []
    for _ in range(n_rows):
        label = r.choice(["a", "b"])
        words = " ".join(r.choice(["ab", "cd", "ef", "gh"]) for _ in range(r.randint(2, 6)))
        rows.append({"text": f"{words} {label}{label}", "label": label})
    data = d / "data.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    return str(model), str(data)
