// bindings.cpp — pybind11 module edgetune._kernels: qgemm_q4/qgemm_q8, the RNG, threads, paths.
// Arrays are checked here (ValueError on any mismatch) and never copied: codes may be a strided
// zero-copy view into a memory-mapped file.  The GIL is released while the kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "edgetune/block.h"
#include "edgetune/ops.h"
#include "edgetune/qgemm.h"
#include "edgetune/rng.h"
#include "edgetune/rng_ops.h"

namespace py = pybind11;
using namespace edgetune;

namespace {

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

bool is_f32(const py::array& a) { return a.dtype().kind() == 'f' && a.itemsize() == 4; }

bool c_contig_2d(const py::array& a) {
    return a.ndim() == 2 && a.strides(1) == a.itemsize() && a.strides(0) == a.shape(1) * a.itemsize();
}

void require_f32_2d(const py::array& a, const char* what, int64_t rows, int64_t cols) {
    if (!is_f32(a) || !c_contig_2d(a))
        throw py::value_error(std::string("qgemm: ") + what + " must be a C-contiguous float32 2-D array, got dtype " +
                              std::string(py::str(a.dtype())) + " shape " + shape_str(a));
    if (a.shape(0) != rows || a.shape(1) != cols)
        throw py::value_error(std::string("qgemm: ") + what + " has shape " + shape_str(a) + ", expected (" +
                              std::to_string(rows) + ", " + std::to_string(cols) + ")");
}

py::array_t<float> run(py::array x, const QMatrix& wq, py::object out, uint64_t seed, uint64_t tensor_id,
                       double eps, int sign, int dist, bool perturb, const std::string& path_s) {
    const Path path = path_from_name(path_s);
    qgemm_check(wq, path);
    if (!is_f32(x) || x.ndim() != 2 || !c_contig_2d(x))
        throw py::value_error("qgemm: x must be a C-contiguous float32 [M, K] array, got dtype " +
                              std::string(py::str(x.dtype())) + " shape " + shape_str(x));
    if (x.shape(1) != wq.K)
        throw py::value_error("qgemm: x has shape " + shape_str(x) + " but W is [N=" + std::to_string(wq.N) +
                              ", K=" + std::to_string(wq.K) + "]: inner dimensions differ");
    if (sign != 1 && sign != -1) throw py::value_error("qgemm: sign must be +1 or -1");
    if (dist != 0 && dist != 1) throw py::value_error("qgemm: dist must be 0 (rademacher) or 1 (gaussian)");
    const int64_t M = x.shape(0);
    py::array_t<float> y;
    if (out.is_none()) {
        y = py::array_t<float>({static_cast<py::ssize_t>(M), static_cast<py::ssize_t>(wq.N)});
    } else {
        py::array o = py::reinterpret_borrow<py::array>(out);
        if (!py::isinstance<py::array>(out)) throw py::value_error("qgemm: out must be a numpy array");
        require_f32_2d(o, "out", M, wq.N);
        if (!o.writeable()) throw py::value_error("qgemm: out is read-only");
        y = py::reinterpret_borrow<py::array_t<float>>(out);
    }
    Perturbation p;
    p.active = perturb;
    p.seed = seed;
    p.tensor_id = tensor_id;
    p.eps_sign = static_cast<float>(eps * sign);
    p.dist = dist;
    const float* xp = static_cast<const float*>(x.data());
    float* yp = y.mutable_data();
    {
        py::gil_scoped_release nogil;
        qgemm(xp, M, wq, p, yp, path);
    }
    return y;
}

QMatrix matrix_from(py::array codes, py::array scales, py::object mins, int bits, int offset,
                    py::object packed = py::none()) {
    QMatrix w;
    w.bits = bits;
    if (codes.ndim() != 3 || codes.itemsize() != 1 || (codes.dtype().kind() != 'u' && codes.dtype().kind() != 'i'))
        throw py::value_error(std::string("qgemm: codes must be a 3-D ") + (bits == 4 ? "uint8 [N, K/32, 16]" : "int8 [N, K/G, G]") +
                              " array, got dtype " + std::string(py::str(codes.dtype())) + " shape " + shape_str(codes));
    if (bits == 4 && codes.shape(2) != 16)
        throw py::value_error("qgemm: q4 codes must be [N, K/32, 16], got shape " + shape_str(codes));
    if (bits == 8 && codes.shape(2) != 16 && codes.shape(2) != 32)
        throw py::value_error("qgemm: q8 codes must be [N, K/G, G] with G 16 or 32, got shape " + shape_str(codes));
    if (codes.shape(2) > 1 && codes.strides(2) != 1)
        throw py::value_error("qgemm: the last axis of codes must be contiguous (stride 1), got strides " +
                              std::to_string(codes.strides(2)));
    w.group = bits == 4 ? 32 : static_cast<int>(codes.shape(2));
    w.N = codes.shape(0);
    w.K = codes.shape(1) * w.group;
    w.codes = static_cast<const uint8_t*>(codes.data());
    w.row_stride = codes.strides(0);
    w.block_stride = codes.strides(1);
    w.offset = offset;
    const int64_t NG = codes.shape(1);
    require_f32_2d(scales, "scales", w.N, NG);
    w.scales = static_cast<const float*>(scales.data());
    if (!mins.is_none()) {
        py::array m = py::reinterpret_borrow<py::array>(mins);
        if (!py::isinstance<py::array>(mins)) throw py::value_error("qgemm: mins must be a numpy array or None");
        require_f32_2d(m, "mins", w.N, NG);
        w.mins = static_cast<const float*>(m.data());
    }
    if (!packed.is_none()) {
        if (!py::isinstance<py::array>(packed)) throw py::value_error("qgemm: packed must be a numpy array or None");
        py::array pk = py::reinterpret_borrow<py::array>(packed);
        const int64_t want = prepack_q4_bytes(w.N, w.K);
        if (bits != 4 || pk.itemsize() != 1 || pk.ndim() != 1 || pk.shape(0) != want ||
            (pk.shape(0) > 1 && pk.strides(0) != 1))
            throw py::value_error("qgemm: packed must be kernels.prepack_q4's contiguous uint8 array of " +
                                  std::to_string(want) + " bytes for a q4 [" + std::to_string(w.N) + ", " +
                                  std::to_string(w.K) + "] matrix, got shape " + shape_str(pk));
        w.packed = static_cast<const uint8_t*>(pk.data());
    }
    return w;
}

Perturbation make_perturbation(bool perturb, uint64_t seed, uint64_t tensor_id, double eps, int sign, int dist) {
    if (sign != 1 && sign != -1) throw py::value_error("qgemm: sign must be +1 or -1");
    if (dist != 0 && dist != 1) throw py::value_error("qgemm: dist must be 0 (rademacher) or 1 (gaussian)");
    Perturbation p;
    p.active = perturb;
    p.seed = seed;
    p.tensor_id = tensor_id;
    p.eps_sign = static_cast<float>(eps * sign);
    p.dist = dist;
    return p;
}

// segs: list of (bits, codes, scales, mins|None, offset, perturb, seed, tensor_id, eps, sign, dist);
// out: float32 [M, sum of N] written in place (segment columns in list order).
void run_multi(py::array x, py::list segs, py::array out, const std::string& path_s) {
    const Path path = path_from_name(path_s);
    if (segs.size() == 0) throw py::value_error("qgemm_multi: no segments");
    std::vector<Segment> v;
    std::vector<py::object> keep;  // keep arrays referenced while the kernel runs
    int64_t col = 0;
    for (py::handle h : segs) {
        py::tuple t = py::reinterpret_borrow<py::tuple>(h);
        if (t.size() != 11 && t.size() != 12)
            throw py::value_error("qgemm_multi: each segment is an 11-tuple (+ packed codes or None)");
        const int bits = t[0].cast<int>();
        Segment sg;
        sg.w = matrix_from(t[1].cast<py::array>(), t[2].cast<py::array>(), py::reinterpret_borrow<py::object>(t[3]),
                           bits, t[4].cast<int>(), t.size() == 12 ? py::object(t[11]) : py::object(py::none()));
        sg.p = make_perturbation(t[5].cast<bool>(), t[6].cast<uint64_t>(), t[7].cast<uint64_t>(), t[8].cast<double>(),
                                 t[9].cast<int>(), t[10].cast<int>());
        sg.col = col;
        col += sg.w.N;
        keep.push_back(py::reinterpret_borrow<py::object>(h));
        v.push_back(sg);
    }
    if (!is_f32(x) || x.ndim() != 2 || !c_contig_2d(x))
        throw py::value_error("qgemm: x must be a C-contiguous float32 [M, K] array, got dtype " +
                              std::string(py::str(x.dtype())) + " shape " + shape_str(x));
    if (x.shape(1) != v[0].w.K)
        throw py::value_error("qgemm_multi: x has shape " + shape_str(x) + " but K=" + std::to_string(v[0].w.K));
    const int64_t M = x.shape(0);
    require_f32_2d(out, "out", M, col);
    if (!out.writeable()) throw py::value_error("qgemm: out is read-only");
    const float* xp = static_cast<const float*>(x.data());
    float* yp = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release nogil;
    qgemm_multi(xp, M, v, yp, col, path);
}

// a float32 2-D array whose rows are contiguous (row stride may exceed the width); returns the row stride
int64_t rows_f32(const py::array& a, const char* what) {
    if (!is_f32(a) || a.ndim() != 2 || (a.shape(1) > 1 && a.strides(1) != 4) || a.strides(0) % 4 != 0 ||
        a.strides(0) < 0)
        throw py::value_error(std::string(what) + " must be a float32 2-D array with contiguous rows, got dtype " +
                              std::string(py::str(a.dtype())) + " shape " + shape_str(a));
    return a.strides(0) / 4;
}


// a contiguous float32 vector of length n (norm weights, biases)
const float* vec_f32(const py::handle& h, int64_t n, const std::string& what) {
    py::array a = py::reinterpret_borrow<py::array>(h);
    if (!py::isinstance<py::array>(h) || !is_f32(a) || a.ndim() != 1 || a.shape(0) != n ||
        (n > 1 && a.strides(0) != 4))
        throw py::value_error("block_forward: " + what + " must be a contiguous float32 vector of length " +
                              std::to_string(n));
    return static_cast<const float*>(a.data());
}

// a float32 2-D C-contiguous array of exactly [rows, cols] (block_forward's arguments)
const float* mat_f32(const py::handle& h, int64_t rows, int64_t cols, const std::string& what) {
    py::array a = py::reinterpret_borrow<py::array>(h);
    if (!py::isinstance<py::array>(h) || !is_f32(a) || !c_contig_2d(a) || a.shape(0) != rows || a.shape(1) != cols)
        throw py::value_error("block_forward: " + what + " must be a C-contiguous float32 [" + std::to_string(rows) +
                              ", " + std::to_string(cols) + "] array" +
                              (py::isinstance<py::array>(h) ? ", got shape " + shape_str(a) : std::string()));
    return static_cast<const float*>(a.data());
}

// a contiguous 1-D array of n elements of the given kind/size ('i', 8: int64; 'f', 8: float64)
const void* vec_of(const py::handle& h, int64_t n, char kind, int itemsize, const std::string& what, bool write) {
    py::array a = py::reinterpret_borrow<py::array>(h);
    if (!py::isinstance<py::array>(h) || a.dtype().kind() != kind || a.itemsize() != itemsize || a.ndim() != 1 ||
        a.shape(0) != n || (n > 1 && a.strides(0) != itemsize) || (write && !a.writeable()))
        throw py::value_error("block_forward: " + what + " must be a contiguous" + (write ? " writeable " : " ") +
                              (kind == 'i' ? "int64" : "float64") + " vector of length " + std::to_string(n));
    return a.data();
}

constexpr const char* kLayerTuple =
    "block_forward: each layer is a 10-tuple (segments, attn_norm, ffn_norm, biases, terms, head_norms, "
    "post_norms, window, cos, sin)";

// layer: (segments: 7 entries in BlockMatrix order, each a qgemm_multi 11-tuple (bits 32: codes is a
//           float32 [N, K] matrix) or None (absent in a fused layout: k, v, gate),
//         attn_norm, ffn_norm, biases: (q, k, v) vectors or None each | None,
//         terms: 7 entries of None or (lora: None | (A [r, K], B [N, r], scale),
//                                      sparse: None | (rows int64, cols int64, delta float32),
//                                      input_sq: None | writeable float64 [K]),
//         head_norms: None | (q_norm, k_norm) [head_dim], post_norms: None | (attn, ffn) [n_embd],
//         window: int (0 = none), cos, sin: None | this layer's tables [T, rope_dim/2])
BlockWeights block_weights_from(const py::handle& layer, const BlockConfig& c, int64_t T) {
    if (!py::isinstance<py::tuple>(layer)) throw py::value_error(kLayerTuple);
    py::tuple t = py::reinterpret_borrow<py::tuple>(layer);
    if (t.size() != 10) throw py::value_error(kLayerTuple);
    BlockWeights w;
    py::sequence segs = t[0].cast<py::sequence>();
    py::sequence terms = t[4].cast<py::sequence>();
    if (segs.size() != BM_COUNT || terms.size() != BM_COUNT)
        throw py::value_error("block_forward: a layer needs 7 segments and 7 term entries (q, k, v, o, gate, up, down)");
    static const char* names[BM_COUNT] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
    for (int i = 0; i < BM_COUNT; ++i) {
        const std::string nm = names[i];
        py::object so = segs[i];
        if (so.is_none()) {  // absent: fused layout
            if (!py::object(terms[i]).is_none()) throw py::value_error("block_forward: " + nm + " is absent but has terms");
            continue;
        }
        py::tuple sg = so.cast<py::tuple>();
        if (sg.size() != 11 && sg.size() != 12)
            throw py::value_error("block_forward: each segment is an 11-tuple (+ packed codes or None)");
        const int bits = sg[0].cast<int>();
        if (bits == 32) {
            py::array d = sg[1].cast<py::array>();
            if (!is_f32(d) || !c_contig_2d(d))
                throw py::value_error("block_forward: " + nm + " float32 rows must be a C-contiguous [N, K] array");
            w.w[i].N = d.shape(0);
            w.w[i].K = d.shape(1);
            w.dense[i] = static_cast<const float*>(d.data());
        } else {
            w.w[i] = matrix_from(sg[1].cast<py::array>(), sg[2].cast<py::array>(),
                                 py::reinterpret_borrow<py::object>(sg[3]), bits, sg[4].cast<int>(),
                                 sg.size() == 12 ? py::object(sg[11]) : py::object(py::none()));
            w.p[i] = make_perturbation(sg[5].cast<bool>(), sg[6].cast<uint64_t>(), sg[7].cast<uint64_t>(),
                                       sg[8].cast<double>(), sg[9].cast<int>(), sg[10].cast<int>());
        }
        const int64_t N = w.w[i].N, K = w.w[i].K;
        py::object to = terms[i];
        if (to.is_none()) continue;
        py::tuple tt = to.cast<py::tuple>();
        if (tt.size() != 3) throw py::value_error("block_forward: a term entry is (lora, sparse, input_sq)");
        if (!py::object(tt[0]).is_none()) {
            py::tuple lt = tt[0].cast<py::tuple>();
            if (lt.size() != 3) throw py::value_error("block_forward: a LoRA entry is (A, B, scale)");
            py::array a = lt[0].cast<py::array>();
            if (!is_f32(a) || a.ndim() != 2 || !c_contig_2d(a) || a.shape(1) != K)
                throw py::value_error("block_forward: LoRA A of " + nm + " must be a C-contiguous float32 [rank, " +
                                      std::to_string(K) + "] array, got shape " + shape_str(a));
            w.lora[i].a = static_cast<const float*>(a.data());
            w.lora[i].b = mat_f32(lt[1], N, a.shape(0), "LoRA B of " + nm);
            w.lora[i].rank = a.shape(0);
            w.lora[i].scale = static_cast<float>(lt[2].cast<double>());
        }
        if (!py::object(tt[1]).is_none()) {
            py::tuple st = tt[1].cast<py::tuple>();
            if (st.size() != 3) throw py::value_error("block_forward: a sparse entry is (rows, cols, delta)");
            const int64_t n = py::array(st[2].cast<py::array>()).size();
            SparseTerm& s = w.sparse[i];
            s.rows = static_cast<const int64_t*>(vec_of(st[0], n, 'i', 8, "sparse rows of " + nm, false));
            s.cols = static_cast<const int64_t*>(vec_of(st[1], n, 'i', 8, "sparse cols of " + nm, false));
            s.delta = vec_f32(st[2], n, "sparse deltas of " + nm);
            s.n = n;
            for (int64_t j = 0; j < n; ++j)
                if (s.rows[j] < 0 || s.rows[j] >= N || s.cols[j] < 0 || s.cols[j] >= K)
                    throw py::value_error("block_forward: sparse index (" + std::to_string(s.rows[j]) + ", " +
                                          std::to_string(s.cols[j]) + ") is outside " + nm + " [" +
                                          std::to_string(N) + ", " + std::to_string(K) + "]");
        }
        if (!py::object(tt[2]).is_none())
            w.input_sq[i] = static_cast<double*>(const_cast<void*>(vec_of(tt[2], K, 'f', 8, "input_sq of " + nm, true)));
    }
    w.attn_norm = vec_f32(t[1], c.n_embd, "attn_norm");
    w.ffn_norm = vec_f32(t[2], c.n_embd, "ffn_norm");
    const int64_t kv = c.n_head_kv * c.head_dim;
    if (!t[3].is_none()) {
        py::sequence bs = t[3].cast<py::sequence>();
        if (bs.size() != 3) throw py::value_error("block_forward: biases are (q, k, v)");
        const int64_t n[3] = {c.q_dim(), kv, kv};
        for (int i = 0; i < 3; ++i)
            if (!bs[i].is_none()) w.bias[i] = vec_f32(bs[i], n[i], "bias");
    }
    if (!t[5].is_none()) {
        py::sequence hn = t[5].cast<py::sequence>();
        if (hn.size() != 2) throw py::value_error("block_forward: head_norms are (q_norm, k_norm)");
        w.q_norm = vec_f32(hn[0], c.head_dim, "q head norm");
        w.k_norm = vec_f32(hn[1], c.head_dim, "k head norm");
    }
    if (!t[6].is_none()) {
        py::sequence pn = t[6].cast<py::sequence>();
        if (pn.size() != 2) throw py::value_error("block_forward: post_norms are (post_attention_norm, post_ffw_norm)");
        w.post_attn_norm = vec_f32(pn[0], c.n_embd, "post_attention_norm");
        w.post_ffn_norm = vec_f32(pn[1], c.n_embd, "post_ffw_norm");
    }
    w.window = t[7].cast<int64_t>();
    if (w.window < 0) throw py::value_error("block_forward: window must be >= 0");
    if (!t[8].is_none() || !t[9].is_none()) {
        w.cos = mat_f32(t[8], T, c.rope_dim / 2, "layer cos");
        w.sin = mat_f32(t[9], T, c.rope_dim / 2, "layer sin");
    }
    return w;
}
}  // namespace

PYBIND11_MODULE(_kernels, m) {
    m.doc() = "edgetune C++ kernels: quantized GEMM with in-kernel scale perturbation, counter-based RNG";

    m.def("qgemm_q4",
          [](py::array x, py::array codes, py::array scales, py::object mins, int offset, py::object out, uint64_t seed,
             uint64_t tensor_id, double eps, int sign, int dist, bool perturb, const std::string& path,
             py::object packed) {
              return run(x, matrix_from(codes, scales, mins, 4, offset, packed), out, seed, tensor_id, eps, sign, dist,
                         perturb, path);
          },
          py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("mins") = py::none(), py::arg("offset") = 0,
          py::arg("out") = py::none(), py::arg("seed") = 0, py::arg("tensor_id") = 0, py::arg("eps") = 0.0,
          py::arg("sign") = 1, py::arg("dist") = 0, py::arg("perturb") = false, py::arg("path") = "auto",
          py::arg("packed") = py::none(),
          "y[M,N] = x[M,K] @ W^T, W q4: w = s*(q - offset) + m; perturb=True reads s + eps*sign*z(seed, tensor_id); "
          "packed: prepack_q4(codes), read by the avx512/amx paths");
    m.def("prepack_q4",
          [](py::array codes) {
              if (codes.ndim() != 3 || codes.itemsize() != 1 || codes.shape(2) != 16 ||
                  (codes.dtype().kind() != 'u' && codes.dtype().kind() != 'i'))
                  throw py::value_error("prepack_q4: codes must be a uint8 [N, K/32, 16] array, got dtype " +
                                        std::string(py::str(codes.dtype())) + " shape " + shape_str(codes));
              if (codes.strides(2) != 1)
                  throw py::value_error("prepack_q4: the last axis of codes must be contiguous (stride 1)");
              QMatrix w;
              w.bits = 4;
              w.group = 32;
              w.N = codes.shape(0);
              w.K = codes.shape(1) * 32;
              w.codes = static_cast<const uint8_t*>(codes.data());
              w.row_stride = codes.strides(0);
              w.block_stride = codes.strides(1);
              py::array_t<uint8_t> out(static_cast<py::ssize_t>(prepack_q4_bytes(w.N, w.K)));
              uint8_t* dst = out.mutable_data();
              {
                  py::gil_scoped_release nogil;
                  prepack_q4(w, dst);
              }
              return out;
          },
          py::arg("codes"),
          "q4 codes [N, K/32, 16] -> the prepacked panel layout (1-D uint8, see edgetune/qgemm.h prepack_q4)");
    m.def("qgemm_q8",
          [](py::array x, py::array codes, py::array scales, py::object mins, py::object out, uint64_t seed,
             uint64_t tensor_id, double eps, int sign, int dist, bool perturb, const std::string& path) {
              return run(x, matrix_from(codes, scales, mins, 8, 0), out, seed, tensor_id, eps, sign, dist, perturb, path);
          },
          py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("mins") = py::none(), py::arg("out") = py::none(),
          py::arg("seed") = 0, py::arg("tensor_id") = 0, py::arg("eps") = 0.0, py::arg("sign") = 1, py::arg("dist") = 0,
          py::arg("perturb") = false, py::arg("path") = "auto",
          "y[M,N] = x[M,K] @ W^T, W q8 (group G = codes.shape[2]): w = s*q + m");
    m.def("qgemm_multi", &run_multi, py::arg("x"), py::arg("segments"), py::arg("out"), py::arg("path") = "auto",
          "fused y = x @ [W_0; W_1; ...]^T into out[M, sum N]; segments: list of (bits, codes, scales, mins, "
          "offset, perturb, seed, tensor_id, eps, sign, dist)");
    m.def("rms_norm",
          [](py::array x, py::array w, float eps, py::array out) {
              const int64_t ldx = rows_f32(x, "rms_norm: x");
              const int64_t M = x.shape(0), D = x.shape(1);
              if (!is_f32(w) || w.ndim() != 1 || w.shape(0) != D || (D > 1 && w.strides(0) != 4))
                  throw py::value_error("rms_norm: w must be a contiguous float32 vector of length D");
              require_f32_2d(out, "rms_norm out", M, D);
              const float* xp = static_cast<const float*>(x.data());
              const float* wp = static_cast<const float*>(w.data());
              float* op = static_cast<float*>(out.mutable_data());
              py::gil_scoped_release nogil;
              rms_norm(xp, M, D, ldx, wp, eps, op);
          },
          py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("out"), "out = x * rsqrt(mean(x^2) + eps) * w (rows)");
    m.def("silu_mul",
          [](py::array g, py::array u, py::array out) {
              const int64_t ld = rows_f32(g, "silu_mul: g");
              if (rows_f32(u, "silu_mul: u") != ld || u.shape(0) != g.shape(0) || u.shape(1) != g.shape(1))
                  throw py::value_error("silu_mul: g and u must have the same shape and row stride");
              const int64_t M = g.shape(0), F = g.shape(1);
              require_f32_2d(out, "silu_mul out", M, F);
              const float* gp = static_cast<const float*>(g.data());
              const float* up = static_cast<const float*>(u.data());
              float* op = static_cast<float*>(out.mutable_data());
              py::gil_scoped_release nogil;
              silu_mul(gp, up, M, F, ld, op);
          },
          py::arg("g"), py::arg("u"), py::arg("out"), "out = silu(g) * u");
    m.def("attention",
          [](py::array q, py::array k, py::array v, int64_t B, int64_t T, int64_t H, int64_t Hkv, py::array cos,
             py::array sin, bool neox, float scale, py::array out, int64_t window) {
              const int64_t ldq = rows_f32(q, "attention: q"), ldk = rows_f32(k, "attention: k"),
                            ldv = rows_f32(v, "attention: v");
              if (H <= 0 || Hkv <= 0 || H % Hkv != 0 || B < 0 || T <= 0)
                  throw py::value_error("attention: bad head counts or sizes");
              const int64_t hd = q.shape(1) / H;
              if (q.shape(0) != B * T || k.shape(0) != B * T || v.shape(0) != B * T || q.shape(1) != H * hd ||
                  k.shape(1) != Hkv * hd || v.shape(1) != Hkv * hd)
                  throw py::value_error("attention: q/k/v shapes do not match B, T, H, Hkv");
              require_f32_2d(cos, "attention cos", T, cos.shape(1));
              require_f32_2d(sin, "attention sin", T, cos.shape(1));
              const int64_t rd = 2 * cos.shape(1);
              if (rd > hd) throw py::value_error("attention: rope_dim > head_dim");
              require_f32_2d(out, "attention out", B * T, H * hd);
              const float* qp = static_cast<const float*>(q.data());
              const float* kp = static_cast<const float*>(k.data());
              const float* vp = static_cast<const float*>(v.data());
              const float* cp = static_cast<const float*>(cos.data());
              const float* sp = static_cast<const float*>(sin.data());
              float* op = static_cast<float*>(out.mutable_data());
              py::gil_scoped_release nogil;
              attention(qp, kp, vp, ldq, ldk, ldv, B, T, H, Hkv, hd, cp, sp, rd, neox, scale, op, window);
          },
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("B"), py::arg("T"), py::arg("H"), py::arg("Hkv"),
          py::arg("cos"), py::arg("sin"), py::arg("neox"), py::arg("scale"), py::arg("out"), py::arg("window") = 0,
          "causal attention with RoPE; q/k/v/out [B*T, heads*hd]; window > 0: key j hidden from query p when "
          "p - j >= window");
    m.def("ops_simd", &ops_simd, "whether rms_norm/silu_mul/attention run as AVX-512 intrinsics");
    m.def("ops_set_simd", &ops_set_simd, py::arg("on"),
          "use the AVX-512 intrinsics (default where the CPU has AVX-512F) or force the portable loops; "
          "returns whether the intrinsics are used now");
    m.def("block_forward",
          [](py::array h, py::array out, py::tuple cfg, py::list layers, int64_t B, int64_t T, py::array cos,
             py::array sin, const std::string& path_s, py::object keep_rows) {
              if (cfg.size() != 10)
                  throw py::value_error("block_forward: cfg is (n_embd, n_head, n_head_kv, head_dim, n_ff, rope_dim, "
                                        "neox, rms_eps, attn_scale, act)");
              BlockConfig c;
              c.n_embd = cfg[0].cast<int64_t>();
              c.n_head = cfg[1].cast<int64_t>();
              c.n_head_kv = cfg[2].cast<int64_t>();
              c.head_dim = cfg[3].cast<int64_t>();
              c.n_ff = cfg[4].cast<int64_t>();
              c.rope_dim = cfg[5].cast<int64_t>();
              c.neox = cfg[6].cast<bool>();
              c.rms_eps = cfg[7].cast<float>();
              c.attn_scale = cfg[8].cast<float>();
              c.act = cfg[9].cast<int>();
              const Path path = path_from_name(path_s);
              require_f32_2d(h, "block_forward h", B * T, c.n_embd);
              // keep_rows: None or a 1-D int64 array of row indices into B*T (out is then [n_keep, n_embd])
              const int64_t* kp = nullptr;
              int64_t n_keep = 0;
              if (!keep_rows.is_none()) {
                  py::array k = py::reinterpret_borrow<py::array>(keep_rows);
                  if (!py::isinstance<py::array>(keep_rows) || k.ndim() != 1 || k.dtype().kind() != 'i' ||
                      k.itemsize() != 8 || (k.shape(0) > 1 && k.strides(0) != 8))
                      throw py::value_error("block_forward: keep_rows must be a contiguous 1-D int64 array of row "
                                            "indices into B*T" +
                                            (py::isinstance<py::array>(keep_rows)
                                                 ? ", got dtype " + std::string(py::str(k.dtype())) + " shape " +
                                                       shape_str(k)
                                                 : std::string()));
                  n_keep = k.shape(0);
                  kp = static_cast<const int64_t*>(k.data());
                  for (int64_t i = 0; i < n_keep; ++i)
                      if (kp[i] < 0 || kp[i] >= B * T)
                          throw py::value_error("block_forward: keep_rows[" + std::to_string(i) + "] = " +
                                                std::to_string(kp[i]) + " is outside 0.." +
                                                std::to_string(B * T - 1) + " (B*T rows)");
              }
              if (kp && n_keep == 0) {  // numpy gives an empty array zero strides: check its shape only
                  if (!is_f32(out) || out.ndim() != 2 || out.shape(0) != 0 || out.shape(1) != c.n_embd)
                      throw py::value_error("block_forward: out must be a float32 [0, n_embd] array for no keep_rows");
              } else {
                  require_f32_2d(out, "block_forward out", kp ? n_keep : B * T, c.n_embd);
              }
              if (!out.writeable()) throw py::value_error("block_forward: out is read-only");
              require_f32_2d(cos, "block_forward cos", T, c.rope_dim / 2);
              require_f32_2d(sin, "block_forward sin", T, c.rope_dim / 2);
              std::vector<BlockWeights> ws;
              ws.reserve(layers.size());
              for (py::handle l : layers) ws.push_back(block_weights_from(l, c, T));
              for (const BlockWeights& w : ws)
                  for (int i = 0; i < BM_COUNT; ++i)
                      if (w.w[i].N && !w.dense[i]) qgemm_check(w.w[i], path);
              const float* hp = static_cast<const float*>(h.data());
              float* op = static_cast<float*>(out.mutable_data());
              const float* cp = static_cast<const float*>(cos.data());
              const float* sp = static_cast<const float*>(sin.data());
              py::gil_scoped_release nogil;
              blocks_forward(c, ws.data(), static_cast<int>(ws.size()), hp, op, B, T, cp, sp, path, kp, n_keep);
          },
          py::arg("h"), py::arg("out"), py::arg("cfg"), py::arg("layers"), py::arg("B"), py::arg("T"), py::arg("cos"),
          py::arg("sin"), py::arg("path") = "auto", py::arg("keep_rows") = py::none(),
          "transformer blocks in order on h [B*T, n_embd] -> out (may be h); layers: list of 10-tuples (segments, "
          "attn_norm, ffn_norm, biases, terms, head_norms, post_norms, window, cos, sin); keep_rows: None or int64 "
          "row indices: out is [len, n_embd], those rows only (the last layer skips the others after attention)");
    m.def("add_rms_norm",
          [](py::array a, py::array b, py::array w, float eps, py::array sum, py::array out) {
              const int64_t lda = rows_f32(a, "add_rms_norm: a"), ldb = rows_f32(b, "add_rms_norm: b");
              const int64_t M = a.shape(0), D = a.shape(1);
              if (b.shape(0) != M || b.shape(1) != D) throw py::value_error("add_rms_norm: a and b shapes differ");
              if (!is_f32(w) || w.ndim() != 1 || w.shape(0) != D || (D > 1 && w.strides(0) != 4))
                  throw py::value_error("add_rms_norm: w must be a contiguous float32 vector of length D");
              require_f32_2d(sum, "add_rms_norm sum", M, D);
              require_f32_2d(out, "add_rms_norm out", M, D);
              const float* ap = static_cast<const float*>(a.data());
              const float* bp = static_cast<const float*>(b.data());
              const float* wp = static_cast<const float*>(w.data());
              float* sp = static_cast<float*>(sum.mutable_data());
              float* op = static_cast<float*>(out.mutable_data());
              py::gil_scoped_release nogil;
              add_rms_norm(ap, lda, bp, ldb, M, D, wp, eps, sp, op);
          },
          py::arg("a"), py::arg("b"), py::arg("w"), py::arg("eps"), py::arg("sum"), py::arg("out"),
          "sum = a + b, out = rms_norm(sum) * w, one pass over the rows (the block's residual + next norm)");
    m.def("gelu_mul",
          [](py::array g, py::array u, py::array out) {
              const int64_t ld = rows_f32(g, "gelu_mul: g");
              if (rows_f32(u, "gelu_mul: u") != ld || u.shape(0) != g.shape(0) || u.shape(1) != g.shape(1))
                  throw py::value_error("gelu_mul: g and u must have the same shape and row stride");
              const int64_t M = g.shape(0), F = g.shape(1);
              require_f32_2d(out, "gelu_mul out", M, F);
              const float* gp = static_cast<const float*>(g.data());
              const float* up = static_cast<const float*>(u.data());
              float* op = static_cast<float*>(out.mutable_data());
              py::gil_scoped_release nogil;
              gelu_mul(gp, up, M, F, ld, op);
          },
          py::arg("g"), py::arg("u"), py::arg("out"), "out = gelu_tanh(g) * u (the block's GELU gate)");
    m.def("block_arena_bytes", &block_arena_bytes, "bytes held by the block scratch arena");
    m.def("block_last_ffn_rows", &block_last_ffn_rows,
          "rows the last layer of the latest block_forward call ran its o-projection and FFN on");
    m.def("rng_perturbation",
          [](uint64_t seed, uint64_t tensor_id, int64_t n, int dist, uint64_t offset) {
              if (n < 0) throw py::value_error("rng_perturbation: n < 0");
              if (dist != 0 && dist != 1) throw py::value_error("rng_perturbation: dist must be 0 or 1");
              py::array_t<float> z(static_cast<py::ssize_t>(n));
              float* p = z.mutable_data();
              {
                  py::gil_scoped_release nogil;
                  rng_fill(p, n, seed, tensor_id, dist, offset);
              }
              return z;
          },
          py::arg("seed"), py::arg("tensor_id"), py::arg("n"), py::arg("dist") = 0, py::arg("offset") = 0,
          "z for elements offset..offset+n-1 (float32), bit-identical to edgetune.zo.rng.perturbation");
    m.def("rng_axpy",
          [](py::array out, double alpha, uint64_t seed, uint64_t tensor_id, int dist, uint64_t offset) {
              if (!is_f32(out) || !(out.flags() & py::array::c_style) || !out.writeable())
                  throw py::value_error("rng_axpy: out must be a writeable C-contiguous float32 array, got dtype " +
                                        std::string(py::str(out.dtype())) + " shape " + shape_str(out));
              if (dist != 0 && dist != 1) throw py::value_error("rng_axpy: dist must be 0 or 1");
              float* p = static_cast<float*>(out.mutable_data());
              const int64_t n = out.size();
              const float a = static_cast<float>(alpha);
              py::gil_scoped_release nogil;
              rng_axpy(p, n, a, seed, tensor_id, dist, offset);
          },
          py::arg("out"), py::arg("alpha"), py::arg("seed"), py::arg("tensor_id"), py::arg("dist") = 0,
          py::arg("offset") = 0,
          "out += float32(alpha) * z(seed, tensor_id, offset + flat index), in place, multi-threaded");
    m.def("set_num_threads", [](int n) { py::gil_scoped_release nogil; set_num_threads(n); }, py::arg("n"),
          "kernel threads (n <= 0: number of cores)");
    m.def("get_num_threads", &get_num_threads);
    m.def("available_paths", [] {
        std::vector<std::string> v;
        for (Path p : available_paths()) v.push_back(path_name(p));
        return v;
    }, "kernel paths this CPU can run, slowest to fastest (always includes 'scalar')");
    m.def("best_path", [] { return std::string(path_name(best_path())); });
}
