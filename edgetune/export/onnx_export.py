"""ONNX export: edgetune's forward as a graph onnxruntime runs, with the trainable tensors as inputs.

    edgetune export --run runs/x --format onnx --out app/model.onnx
    build_onnx(net, trainable, out) -> Path          (any loaded model, optionally a trainable set)
    export_onnx(run_dir, out, model=None, overwrite=False) -> Path

Why: a phone app ships onnxruntime, and ZO training needs nothing but inference.  The app feeds
theta + eps*z and theta - eps*z as *graph inputs*, runs the session twice, and updates theta
itself (see README "Fine-tune inside an app with onnxruntime" and edgetune/backends/ort.py).

Files written (all three next to each other; names are what the graph refers to):
  model.onnx                       the graph (small), opset 18 + com.microsoft 1
  model.onnx.data                  external data: every weight, streamed tensor by tensor
  model.onnx.trainable.safetensors the current value of each trainable input (export_onnx only)

Graph interface
  inputs   input_ids int64 [B, T]   right-padded token ids (the causal mask keeps padding out)
           rows      int64 [R]      flat indices b*T + t of the positions whose logits are wanted
           vocab     int64 [V]      vocabulary ids whose logits are wanted (e.g. label words)
           + one float32 input per trainable tensor, named like edgetune's Params:
             "scales:<tensor>" [N, K/G], "norm:<tensor>" [n], "lora_a:<tensor>" [r, K],
             "lora_b:<tensor>" [N, r]
  output   logits    float32 [R, V]

Weights
  * int4 layer matrices (Q4_0/Q4_1 codes, exactly the GGUF's) -> com.microsoft MatMulNBits,
    bits=4, block_size=32; the nibbles are re-ordered from ggml's layout (byte j = elements j and
    j+16 of the block) to MatMulNBits' (byte i = elements 2i and 2i+1).  Q4_0's offset 8 is the
    operator's default zero point; Q4_1 gets zero points 0 plus its mins as a separate term
    (sum over each 32-group of x) @ mins^T, so w = s*(q - offset) + m exactly as in edgetune.
  * int8 kinds (Q8_0, K-quants edgetune reads as int8 groups of 16/32) -> MatMulNBits bits=8 with
    codes + 128 and zero point 128.
  * Scales that are graph inputs run with accuracy_level=0 (fp32 compute): onnxruntime 1.32's
    int8-compute path (accuracy_level=4) prepacks scales and silently ignores runtime values
    (measured on a 512x4096x4096 MatMulNBits: scales fed at run time gave relative error 1.0 with
    accuracy_level=4 and 3e-6 with 0; the same scales as a constant initializer worked with 4).  Constant scales use `accuracy_level`, default 0 too: measured on
    SmolLM2-135M (10 prompts, 130 positions) against a float64 forward over the same dequantized
    weights, accuracy_level=0 gives top-1 100%, min cosine 1.000000; accuracy_level=4 (int8
    activations) top-1 90.8%, min cosine 0.909 — and was not faster here (1.27 vs 1.30 s for a
    16x32 batch).
  * Embedding and output rows are gathered from the quantized codes and dequantized in the graph,
    so only the requested vocabulary rows are ever expanded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import EdgetuneError
from ..quant import QTensor, unpack_q4

OPSET = 18
ALIGN = 4096                  # external-data alignment (lets onnxruntime map tensors)
CHUNK_ROWS_BYTES = 16 << 20
MAX_ROPE_POSITIONS = 16384    # cos/sin tables are initializers: cap their length
SUPPORTED_METHODS = ("scales", "norms", "lora")


def _onnx():
    try:
        import onnx
        return onnx
    except ImportError:  # pragma: no cover - installed by make
        raise EdgetuneError("ONNX export needs the 'onnx' package (pip install onnx)") from None


class _Graph:
    """A tiny graph builder: nodes in order, initializers streamed to one external-data file."""

    def __init__(self, data_path: Path, location: str):
        onnx = _onnx()
        self.onnx, self.h, self.TP = onnx, onnx.helper, onnx.TensorProto
        self.nodes, self.inits, self.inputs = [], [], []
        self.location = location
        self.data = open(data_path, "wb")
        self._n = 0
        self._consts = {}

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def init(self, name: str, arr) -> str:
        """An initializer; arr may be an ndarray or (dtype, shape, iterator of byte chunks)."""
        if isinstance(arr, np.ndarray):
            dtype, shape, chunks = arr.dtype, arr.shape, [np.ascontiguousarray(arr)]
        else:
            dtype, shape, chunks = arr
        t = self.onnx.TensorProto()
        t.name = name
        t.data_type = self.h.np_dtype_to_tensor_dtype(np.dtype(dtype))
        t.dims.extend(int(d) for d in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes < 1024:   # small: inline
            buf = b"".join(np.ascontiguousarray(c).tobytes() for c in chunks)
            t.raw_data = buf
        else:
            pos = self.data.tell()
            pad = (-pos) % ALIGN
            if pad:
                self.data.write(b"\0" * pad)
                pos += pad
            written = 0
            for c in chunks:
                b = np.ascontiguousarray(c)
                self.data.write(b.data)
                written += b.nbytes
            if written != nbytes:
                raise AssertionError(f"{name}: wrote {written} bytes, expected {nbytes}")
            t.data_location = self.onnx.TensorProto.EXTERNAL
            for k, v in (("location", self.location), ("offset", str(pos)), ("length", str(nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
        self.inits.append(t)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small shared constant (shapes, axes, scalars)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.name("c"), arr)
        return self._consts[key]

    def input(self, name: str, elem, shape) -> str:
        self.inputs.append(self.h.make_tensor_value_info(name, elem, list(shape)))
        return name

    def op(self, op_type: str, inputs, domain: str = "", **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(self.h.make_node(op_type, list(inputs), [out], domain=domain, **attrs))
        return out

    def close(self):
        self.data.flush()
        os.fsync(self.data.fileno())
        self.data.close()


# ---------------------------------------------------------------------------------------------
# weights

def _row_chunks(n_rows: int, row_bytes: int):
    step = max(1, CHUNK_ROWS_BYTES // max(row_bytes, 1))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


def _nbits_codes(qt: QTensor):
    """(bits, block_size, codes chunks in MatMulNBits layout [N, nb, blob]) of a q4/q8 QTensor."""
    N, K = qt.shape
    if qt.kind == "q4":
        nb = K // 32

        def chunks():
            for r0, r1 in _row_chunks(N, K // 2):
                q = unpack_q4(qt.codes[r0:r1]).reshape(r1 - r0, nb, 16, 2)
                yield (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8)
        return 4, 32, (np.uint8, (N, nb, 16), chunks())
    G = qt.group
    nb = K // G

    def chunks8():
        for r0, r1 in _row_chunks(N, K):
            c = np.asarray(qt.codes[r0:r1]).reshape(r1 - r0, nb, G).astype(np.int16) + 128
            yield c.astype(np.uint8)
    return 8, G, (np.uint8, (N, nb, G), chunks8())


def _ggml_codes(qt: QTensor):
    """The QTensor's codes as stored (q4: ggml packed [N, nb, 16]; q8: int8 [N, nb, G])."""
    N = qt.shape[0]
    c = qt.codes
    row_bytes = int(np.prod(c.shape[1:]))

    def chunks():
        for r0, r1 in _row_chunks(N, row_bytes):
            yield np.ascontiguousarray(c[r0:r1])
    return (c.dtype, tuple(c.shape), chunks())


class _Builder:
    def __init__(self, g: _Graph, net, ts, accuracy_level: int):
        self.g, self.net, self.ts, self.acc = g, net, ts, accuracy_level
        self.c = net.config
        self.trained_scales = dict(ts.scales) if ts is not None else {}
        self.trained_norms = {n: p for n, (p, _t) in ts.norms.items()} if ts is not None else {}
        self.lora = dict(ts.lora) if ts is not None else {}
        self._gathers = {}

    # -- pieces ----------------------------------------------------------------------------------
    def vec(self, name: str, t) -> str:
        """A norm weight / bias: a graph input when trained, else an initializer."""
        p = self.trained_norms.get(name)
        if p is not None:
            return self.g.input(p.name, self.g.TP.FLOAT, p.value.shape)
        return self.g.init(name, np.asarray(t, dtype=np.float32))

    def rms_norm(self, x: str, w: str) -> str:
        g = self.g
        ms = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1])], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(self.c.rms_eps, np.float32)])])])
        return g.op("Mul", [g.op("Mul", [x, inv]), w])

    def linear(self, x: str, qt: QTensor) -> str:
        """x [M, K] @ W^T -> [M, N] (+ LoRA)."""
        g = self.g
        N, K = qt.shape
        if qt.kind == "f32":
            w = g.init(qt.name, np.ascontiguousarray(np.asarray(qt.data, np.float32).T))
            y = g.op("MatMul", [x, w])
        else:
            bits, bs, codes = _nbits_codes(qt)
            b = g.init(qt.name + ".codes", codes)
            p = self.trained_scales.get(qt.name)
            if p is not None:
                s = g.input(p.name, g.TP.FLOAT, p.value.shape)
                acc = 0
            else:
                s = g.init(qt.name + ".scales", np.asarray(qt.scales, np.float32))
                acc = self.acc
            nb = K // bs
            ins = [x, b, s]
            if bits == 4 and qt.offset != 8:
                zp = np.full((N, (nb + 1) // 2), (qt.offset & 15) * 17, np.uint8)
                ins.append(g.init(qt.name + ".zp", zp))
            elif bits == 8:
                ins.append(g.init(qt.name + ".zp", np.full((N, nb), 128, np.uint8)))
            y = g.op("MatMulNBits", ins, domain="com.microsoft", K=K, N=N, bits=bits,
                     block_size=bs, accuracy_level=acc)
            if qt.mins is not None:
                xs = g.op("ReduceSum", [g.op("Reshape", [x, g.const([0, nb, bs])]), g.const([-1])],
                          keepdims=0)
                m = g.init(qt.name + ".mins_t", np.ascontiguousarray(np.asarray(qt.mins, np.float32).T))
                y = g.op("Add", [y, g.op("MatMul", [xs, m])])
        lo = self.lora.get(qt.name)
        if lo is not None:
            a = g.input(lo.a.name, g.TP.FLOAT, lo.a.value.shape)
            bb = g.input(lo.b.name, g.TP.FLOAT, lo.b.value.shape)
            t = g.op("Gemm", [x, a], transB=1)
            y = g.op("Add", [y, g.op("Gemm", [t, bb], transB=1, alpha=float(lo.scale))])
        return y

    def gather_rows(self, qt: QTensor, idx: str) -> str:
        """Dequantized rows qt[idx] -> [R, K] float (idx: int64 [R])."""
        g = self.g
        K = qt.shape[1]
        if qt.kind == "f32":
            key = qt.name
            if key not in self._gathers:
                self._gathers[key] = (g.init(qt.name, np.asarray(qt.data, np.float32)),)
            return g.op("Gather", [self._gathers[key][0], idx], axis=0)
        if qt.name not in self._gathers:
            codes = g.init(qt.name + ".codes_ggml", _ggml_codes(qt))
            sc = g.init(qt.name + ".scales", np.asarray(qt.scales, np.float32))
            mn = None if qt.mins is None else g.init(qt.name + ".mins", np.asarray(qt.mins, np.float32))
            self._gathers[qt.name] = (codes, sc, mn)
        codes, sc, mn = self._gathers[qt.name]
        c = g.op("Gather", [codes, idx], axis=0)
        if qt.kind == "q4":
            lo = g.op("BitwiseAnd", [c, g.const(15, np.uint8)])
            hi = g.op("BitShift", [c, g.const(4, np.uint8)], direction="RIGHT")
            q = g.op("Sub", [g.op("Cast", [g.op("Concat", [lo, hi], axis=-1)], to=g.TP.FLOAT),
                             g.const(float(qt.offset), np.float32)])
        else:
            q = g.op("Cast", [c], to=g.TP.FLOAT)
        w = g.op("Mul", [q, g.op("Unsqueeze", [g.op("Gather", [sc, idx], axis=0), g.const([-1])])])
        if mn is not None:
            w = g.op("Add", [w, g.op("Unsqueeze", [g.op("Gather", [mn, idx], axis=0), g.const([-1])])])
        return g.op("Reshape", [w, g.const([-1, K])])

    def rope(self, x: str, cos: str, sin: str) -> str:
        """x [B, T, H, hd]; cos/sin [T, 1, d/2] (normal: [T, 1, d/2, 1])."""
        g, c = self.g, self.c
        d, hd = c.rope_dim, c.head_dim
        xr = x if d == hd else g.op("Slice", [x, g.const([0]), g.const([d]), g.const([-1])])
        if c.rope_mode == "normal":
            p = g.op("Reshape", [xr, g.const([0, 0, 0, d // 2, 2])])
            x1 = g.op("Slice", [p, g.const([0]), g.const([1]), g.const([-1])])
            x2 = g.op("Slice", [p, g.const([1]), g.const([2]), g.const([-1])])
            axis = -1
        else:
            x1 = g.op("Slice", [xr, g.const([0]), g.const([d // 2]), g.const([-1])])
            x2 = g.op("Slice", [xr, g.const([d // 2]), g.const([d]), g.const([-1])])
            axis = -1
        o1 = g.op("Sub", [g.op("Mul", [x1, cos]), g.op("Mul", [x2, sin])])
        o2 = g.op("Add", [g.op("Mul", [x1, sin]), g.op("Mul", [x2, cos])])
        out = g.op("Concat", [o1, o2], axis=axis)
        if c.rope_mode == "normal":
            out = g.op("Reshape", [out, g.const([0, 0, 0, d])])
        if d != hd:
            out = g.op("Concat", [out, g.op("Slice", [x, g.const([d]), g.const([hd]), g.const([-1])])],
                       axis=-1)
        return out

    # -- the model -------------------------------------------------------------------------------
    def build(self):
        g, c, net = self.g, self.c, self.net
        TP = g.TP
        ids = g.input("input_ids", TP.INT64, ["B", "T"])
        rows = g.input("rows", TP.INT64, ["R"])
        vocab = g.input("vocab", TP.INT64, ["V"])
        shape = g.op("Shape", [ids])
        T1 = g.op("Slice", [shape, g.const([1]), g.const([2])])
        T0 = g.op("Squeeze", [T1])
        pos = g.op("Range", [g.const(0), T0, g.const(1)])
        n_pos = min(c.context_length, MAX_ROPE_POSITIONS)
        cos_t, sin_t = net.rope(n_pos)
        cos_t, sin_t = np.asarray(cos_t), np.asarray(sin_t)
        ax = [1, 3] if c.rope_mode == "normal" else [1]
        cos = g.op("Unsqueeze", [g.op("Gather", [g.init("rope.cos", cos_t), pos], axis=0), g.const(ax)])
        sin = g.op("Unsqueeze", [g.op("Gather", [g.init("rope.sin", sin_t), pos], axis=0), g.const(ax)])
        TT = g.op("Concat", [T1, T1], axis=0)
        neg = g.op("ConstantOfShape", [TT], value=g.h.make_tensor("v", TP.FLOAT, [1], [-np.inf]))
        mask = g.op("Trilu", [neg, g.const(1)], upper=1)

        h = self.gather_rows(net.embed, g.op("Reshape", [ids, g.const([-1])]))   # [BT, D]
        H, Hkv, hd = c.n_head, c.n_head_kv, c.head_dim
        rep = H // Hkv
        shape_bthd = g.op("Concat", [g.op("Slice", [shape, g.const([0]), g.const([2])]),
                                     g.const([-1, hd])], axis=0)
        for i, L in enumerate(net.layers):
            x = self.rms_norm(h, self.vec(f"blk.{i}.attn_norm.weight", L.attn_norm))
            qkv = [self.linear(x, L.w[n]) for n in ("attn_q", "attn_k", "attn_v")]
            for j, n in enumerate(("attn_q", "attn_k", "attn_v")):
                if n in L.bias:
                    qkv[j] = g.op("Add", [qkv[j], self.vec(f"blk.{i}.{n}.bias", L.bias[n])])
            q, k, v = (g.op("Reshape", [t, shape_bthd]) for t in qkv)          # [B, T, h, hd]
            q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
            if rep > 1:
                exp_shape = g.op("Concat", [g.op("Slice", [shape, g.const([0]), g.const([2])]),
                                            g.const([Hkv, rep, hd])], axis=0)
                k, v = (g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [t, g.const([3])]), exp_shape]),
                                         shape_bthd]) for t in (k, v))
            qt_ = g.op("Transpose", [q], perm=[0, 2, 1, 3])                  # [B, H, T, hd]
            kt = g.op("Transpose", [k], perm=[0, 2, 3, 1])                   # [B, H, hd, T]
            vt = g.op("Transpose", [v], perm=[0, 2, 1, 3])
            s = g.op("Add", [g.op("Mul", [g.op("MatMul", [qt_, kt]),
                                          g.const(1.0 / np.sqrt(hd), np.float32)]), mask])
            a = g.op("MatMul", [g.op("Softmax", [s], axis=-1), vt])          # [B, H, T, hd]
            a = g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 1, 3]), g.const([-1, c.n_embd])])
            h = g.op("Add", [h, self.linear(a, L.w["attn_output"])])
            x = self.rms_norm(h, self.vec(f"blk.{i}.ffn_norm.weight", L.ffn_norm))
            gate, up = self.linear(x, L.w["ffn_gate"]), self.linear(x, L.w["ffn_up"])
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
            h = g.op("Add", [h, self.linear(act, L.w["ffn_down"])])
        sel = g.op("Gather", [h, rows], axis=0)                                  # [R, D]
        x = self.rms_norm(sel, self.vec("output_norm.weight", net.output_norm))
        w = self.gather_rows(net.output, vocab)                                 # [V, D]
        logits = g.op("MatMul", [x, g.op("Transpose", [w], perm=[1, 0])])
        g.nodes[-1].output[0] = "logits"
        return g.h.make_tensor_value_info("logits", TP.FLOAT, ["R", "V"])


def check_trainable(ts):
    """The ONNX graph has inputs for scales, norms and LoRA; refuse other sets clearly."""
    if ts is None:
        return
    bad = [m for m in ts.methods if m not in SUPPORTED_METHODS]
    if bad:
        raise EdgetuneError(f"ONNX export / the onnxruntime backend support the trainable sets "
                            f"{', '.join(SUPPORTED_METHODS)}; not {', '.join(bad)}")


def build_onnx(net, ts, out, *, accuracy_level: int = 0, doc: str = "") -> Path:
    """Write the forward graph of `net` (a model.Transformer) to `out` (+ `out`.data).

    ts: a TrainableSet whose tensors become graph inputs (None: everything constant).
    The files are written under temporary names and renamed when complete."""
    onnx = _onnx()
    check_trainable(ts)
    if net.stream is not None:
        raise EdgetuneError("ONNX export needs a fully loaded model (no streamed layers)")
    if not net.config.plain_block:
        raise EdgetuneError(f"{net.path}: ONNX export builds llama/mistral/qwen2 blocks only; "
                            f"architecture {net.config.arch!r} (model/archs.py) is not supported "
                            f"there yet (GGUF export is)")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise EdgetuneError("accuracy_level must be 0..4 (onnxruntime MatMulNBits)")
    out = Path(out)
    data_final = out.with_name(out.name + ".data")
    tmp_graph = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp_data = out.with_name(f".{data_final.name}.tmp-{os.getpid()}")
    g = _Graph(tmp_data, data_final.name)
    try:
        b = _Builder(g, net, ts, accuracy_level)
        out_info = b.build()
        g.close()
        graph = g.h.make_graph(g.nodes, "edgetune", g.inputs, [out_info], g.inits)
        model = g.h.make_model(graph, opset_imports=[g.h.make_opsetid("", OPSET),
                                                     g.h.make_opsetid("com.microsoft", 1)],
                               producer_name="edgetune", doc_string=doc)
        model.ir_version = 9
        c = net.config
        meta = {"edgetune.arch": c.arch, "edgetune.n_vocab": str(c.n_vocab),
                "edgetune.max_positions": str(min(c.context_length, MAX_ROPE_POSITIONS)),
                "edgetune.trainable": ",".join(p.name for p in ts.params) if ts is not None else ""}
        for k, v in meta.items():
            e = model.metadata_props.add()
            e.key, e.value = k, v
        with open(tmp_graph, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_data, data_final)
        os.replace(tmp_graph, out)
    except BaseException:
        if not g.data.closed:
            g.data.close()
        for p in (tmp_graph, tmp_data):
            if p.exists():
                p.unlink()
        raise
    return out


def export_onnx(run_dir, out, model=None, overwrite: bool = False, *,
                accuracy_level: int = 0) -> Path:
    """A run's model as ONNX with its trainable tensors as inputs, plus their tuned values in
    `out`.trainable.safetensors (what an app feeds, or perturbs and feeds, at run time)."""
    from safetensors.numpy import save_file
    from ..formats.gguf_writer import check_output
    from ..train.runstate import open_run
    out = check_output(out, overwrite)
    path, m, ts, header = open_run(run_dir, model)
    check_trainable(ts)
    build_onnx(m.net, ts, out, accuracy_level=accuracy_level,
               doc=f"edgetune export of run {Path(str(run_dir)).name} on {os.path.basename(path)}")
    side = out.with_name(out.name + ".trainable.safetensors")
    tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    # tensor ids, pscales and the distribution: what an app needs to draw edgetune's z and write
    # a seed log that edgetune replays (examples/ort_app_zo.py)
    meta = {"methods": ",".join(ts.methods), "edgetune.dist": ts.dist,
            "edgetune.trainable": json.dumps({p.name: [p.tensor_id, p.pscale] for p in ts.params})}
    save_file({p.name: np.ascontiguousarray(p.value) for p in ts.params}, str(tmp), metadata=meta)
    os.replace(tmp, side)
    return out
