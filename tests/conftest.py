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
