"""The build and the package's shape: a missing C++ extension is an error under
EDGETUNE_REQUIRE_KERNELS=1, and edgetune's import graph (function-level imports included) has no cycle."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "edgetune")

# import edgetune.kernels with edgetune._kernels made unimportable (what a broken build looks like)
_BROKEN = "import sys; sys.modules['edgetune._kernels'] = None; import edgetune.kernels as k; print(k.HAVE_KERNELS)"


def _run_without_extension(require: bool):
    env = dict(os.environ)
    env.pop("EDGETUNE_REQUIRE_KERNELS", None)
    if require:
        env["EDGETUNE_REQUIRE_KERNELS"] = "1"
    return subprocess.run([sys.executable, "-c", _BROKEN], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_missing_extension_fails_when_required():
    r = _run_without_extension(require=True)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "EDGETUNE_REQUIRE_KERNELS=1" in r.stderr


def test_numpy_fallback_is_announced_on_stderr():
    r = _run_without_extension(require=False)
    assert r.returncode == 0 and r.stdout.strip() == "False"
    assert "edgetune._kernels is not available" in r.stderr and "numpy" in r.stderr


def test_forward_without_extension_is_a_clear_error(tmp_path):
    """The transformer forward runs only in C++: without the extension qgemm falls back to numpy,
    and a forward says which extension is missing instead of running a Python block."""
    code = ("import sys; sys.modules['edgetune._kernels'] = None\n"
            "import edgetune, numpy as np\n"
            "from edgetune import kernels\n"
            "from edgetune.synth import write_synthetic\n"
            f"p = write_synthetic('tiny', 'q4_0', {str(tmp_path / 'm.gguf')!r}, progress=False)\n"
            "m = edgetune.load(str(p))\n"
            "y = kernels.qgemm(np.ones((2, 64), np.float32), m.net.layers[0].w['attn_q'])\n"
            "assert y.shape == (2, 64)\n"
            "m.logits([[1, 2, 3]])\n")
    env = dict(os.environ)
    env.pop("EDGETUNE_REQUIRE_KERNELS", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert "RuntimeError: the transformer forward runs in the C++ extension" in r.stderr, r.stderr[-2000:]


def test_make_test_requires_the_extension():
    with open(os.path.join(ROOT, "Makefile")) as f:
        make = f.read()
    for target in ("test:", "test-long:"):
        body = make.split("\n" + target, 1)[1].split("\n\n", 1)[0]
        assert "EDGETUNE_REQUIRE_KERNELS=1" in body, target


# --- the import graph --------------------------------------------------------------------------

def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict:
    """edgetune module -> set of edgetune modules it imports, at any level (module, function,
    method), resolved like Python does (a `from pkg import name` naming a submodule counts)."""
    modules = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                modules[_module_name(os.path.join(d, f))] = os.path.join(d, f)
    modules_and_ext = set(modules) | {"edgetune._kernels"}   # the C++ extension: a leaf
    graph = {}
    for mod, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                for a in node.names:  # a submodule, else a name defined in the package/module
                    sub = f"{target}.{a.name}"
                    deps.add(sub if sub in modules_and_ext else target)
        graph[mod] = {d for d in deps if d in modules_and_ext and d != mod}
    return graph


def find_cycle(graph: dict):
    """One cycle as a list of modules [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                c = visit(d)
                if c:
                    return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            c = visit(m)
            if c:
                return c
    return None


def test_cycle_finder_finds_a_function_level_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "edgetune.train.loop" in graph and "edgetune.zo.rng" in graph["edgetune.kernels"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_export_formats_share_no_private_helpers():
    """onnx_export and gguf_export each read runs through runlog, not each other's internals."""
    bad = []
    for f in os.listdir(os.path.join(PKG, "export")):
        if not f.endswith(".py"):
            continue
        with open(os.path.join(PKG, "export", f), encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                bad += [f"{f}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, bad


# --- the training path does not need torch ------------------------------------------------------

_NO_TORCH = """
import sys
from edgetune import cli
for argv in {runs!r}:
    rc = cli.main(argv)
    assert rc in (0, None), (argv, rc)
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("TORCH_MODULES", len(bad), bad[:3])
"""


def test_finetune_eval_and_export_never_import_torch(tmp_path):
    """`import edgetune` + finetune (classification: default head recipe and a body recipe run by
    the C++ block; sparse deltas, calibration included; a gemma3 model; a text run) + eval +
    export run without importing torch: the C++ core does every forward, numpy the rest."""
    from edgetune.synth import write_synthetic
    from tests.conftest import make_tiny_task
    model, data = make_tiny_task(tmp_path, 60)
    gemma = str(write_synthetic("gemma3-tiny", "q4_k_m", tmp_path / "gemma.gguf", seed=1,
                                progress=False))
    text = tmp_path / "text.jsonl"
    text.write_text("".join('{"text": "ab cd ef gh ab cd ef %d"}\n' % i for i in range(40)))
    common = ["--model", model, "--steps", "3", "--batch", "4", "--eval-every", "2", "--eval-limit", "8",
              "--test-limit", "8", "--no-progress", "--overwrite"]
    cls = ["--verbalizer", "a=a,b=b"]
    runs = [
        ["finetune", "--data", data, "--out", str(tmp_path / "r1")] + cls + common,
        ["finetune", "--data", data, "--method", "scales,norms,lora", "--layers", "top:1",
         "--out", str(tmp_path / "r2")] + cls + common,
        ["finetune", "--data", str(text), "--out", str(tmp_path / "r3")] + common,
        ["finetune", "--data", data, "--method", "sparse", "--out", str(tmp_path / "r4")] + cls + common,
        ["finetune", "--data", data, "--method", "scales,norms", "--out", str(tmp_path / "r5")]
        + cls + [a if a != model else gemma for a in common],
        ["eval", "--run", str(tmp_path / "r2"), "--model", model, "--data", data] + cls,
        ["export", "--run", str(tmp_path / "r2"), "--model", model, "--format", "gguf",
         "--out", str(tmp_path / "t.gguf")],
    ]
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", _NO_TORCH.format(runs=runs)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TORCH_MODULES 0 []" in r.stdout, r.stdout[-2000:]
