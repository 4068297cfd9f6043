// bindings.cpp — pybind11 module edgetune._kernels: qgemm_q4/qgemm_q8, the RNG, threads, paths.
// Arrays are checked here (ValueError on any mismatch) and never copied: codes may be a strided
// zero-copy view into a memory-mapped file.  The GIL is released while the kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

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

QMatrix matrix_from(py::array codes, py::array scales, py::object mins, int bits, int offset) {
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
    return w;
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
    m.doc() = "edgetune C++ kernels: quantized GEMM with in-kernel scale perturbation, counter-based RNG";

    m.def("qgemm_q4",
          [](py::array x, py::array codes, py::array scales, py::object mins, int offset, py::object out, uint64_t seed,
             uint64_t tensor_id, double eps, int sign, int dist, bool perturb, const std::string& path) {
              return run(x, matrix_from(codes, scales, mins, 4, offset), out, seed, tensor_id, eps, sign, dist, perturb, path);
          },
          py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("mins") = py::none(), py::arg("offset") = 0,
          py::arg("out") = py::none(), py::arg("seed") = 0, py::arg("tensor_id") = 0, py::arg("eps") = 0.0,
          py::arg("sign") = 1, py::arg("dist") = 0, py::arg("perturb") = false, py::arg("path") = "auto",
          "y[M,N] = x[M,K] @ W^T, W q4: w = s*(q - offset) + m; perturb=True reads s + eps*sign*z(seed, tensor_id)");
    m.def("qgemm_q8",
          [](py::array x, py::array codes, py::array scales, py::object mins, py::object out, uint64_t seed,
             uint64_t tensor_id, double eps, int sign, int dist, bool perturb, const std::string& path) {
              return run(x, matrix_from(codes, scales, mins, 8, 0), out, seed, tensor_id, eps, sign, dist, perturb, path);
          },
          py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("mins") = py::none(), py::arg("out") = py::none(),
          py::arg("seed") = 0, py::arg("tensor_id") = 0, py::arg("eps") = 0.0, py::arg("sign") = 1, py::arg("dist") = 0,
          py::arg("perturb") = false, py::arg("path") = "auto",
          "y[M,N] = x[M,K] @ W^T, W q8 (group G = codes.shape[2]): w = s*q + m");
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
