// capi.cpp — the C entry points of edgetune.h for models, tokens and logits, and the error
// plumbing every entry point shares: C++ exceptions stop here and become an et_status plus a
// per-thread message.
#include <cmath>
#include <cstring>
#include <new>

#include "capi_internal.h"
#include "edgetune/ops.h"

namespace edgetune {
namespace capi {

thread_local std::string t_error;

et_status set_error(et_status s, const std::string& msg) {
    t_error = msg;
    return s;
}

et_status guard_status(const std::exception& e) {
    if (const Error* ce = dynamic_cast<const Error*>(&e)) return set_error(ce->status, ce->what());
    if (dynamic_cast<const std::bad_alloc*>(&e)) return set_error(ET_ERR_BUDGET, "out of memory");
    if (dynamic_cast<const std::invalid_argument*>(&e)) return set_error(ET_ERR_ARG, e.what());
    return set_error(ET_ERR_INTERNAL, e.what());
}

}  // namespace capi
}  // namespace edgetune

using namespace edgetune;
using namespace edgetune::capi;

#define ET_GUARD_BEGIN try {
#define ET_GUARD_END                                                \
    }                                                               \
    catch (const std::exception& e) {                               \
        return guard_status(e);                                     \
    }                                                               \
    catch (...) {                                                   \
        return set_error(ET_ERR_INTERNAL, "unknown C++ exception"); \
    }

extern "C" {

ET_API const char* et_last_error(void) { return t_error.c_str(); }

ET_API const char* et_status_name(et_status s) {
    switch (s) {
        case ET_OK: return "ok";
        case ET_ERR_ARG: return "bad argument";
        case ET_ERR_IO: return "i/o error";
        case ET_ERR_FORMAT: return "bad file format";
        case ET_ERR_UNSUPPORTED: return "unsupported";
        case ET_ERR_BUDGET: return "over the memory budget";
        case ET_ERR_CANCELLED: return "cancelled";
        case ET_ERR_NONFINITE: return "non-finite loss";
        case ET_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

ET_API int et_api_version(void) { return ET_API_VERSION; }

ET_API const char* et_kernel_path(void) { return path_name(best_path()); }

ET_API et_status et_set_threads(int n) {
    ET_GUARD_BEGIN
    set_num_threads(n);
    return ET_OK;
    ET_GUARD_END
}

ET_API et_status et_model_open(const char* path, const et_model_options* options, et_model** out) {
    if (!out) return set_error(ET_ERR_ARG, "et_model_open: out is NULL");
    *out = nullptr;
    if (!path || !*path) return set_error(ET_ERR_ARG, "et_model_open: path is empty");
    ET_GUARD_BEGIN
    std::unique_ptr<et_model> m(new et_model);
    m->m.reset(load_model(path, options));
    *out = m.release();
    return ET_OK;
    ET_GUARD_END
}

ET_API void et_model_close(et_model* m) { delete m; }

ET_API et_status et_model_info_get(const et_model* m, et_model_info* out) {
    if (!m || !out) return set_error(ET_ERR_ARG, "et_model_info_get: model and out are required");
    const Model& M = *m->m;
    out->n_vocab = static_cast<int32_t>(M.n_vocab);
    out->n_embd = static_cast<int32_t>(M.cfg.n_embd);
    out->n_layer = static_cast<int32_t>(M.n_layer);
    out->n_head = static_cast<int32_t>(M.cfg.n_head);
    out->n_head_kv = static_cast<int32_t>(M.cfg.n_head_kv);
    out->n_ff = static_cast<int32_t>(M.cfg.n_ff);
    out->context_length = static_cast<int32_t>(M.context_length);
    out->bos_id = M.tok.bos;
    out->eos_id = M.tok.eos;
    out->add_bos = M.tok.add_bos ? 1 : 0;
    out->planned_bytes = M.planned_bytes;
    out->streamed_layers = static_cast<int32_t>(M.n_streamed);
    return ET_OK;
}

ET_API et_status et_tokenize(const et_model* m, const char* text, int32_t add_bos, int32_t* ids, int32_t cap,
                             int32_t* n_out) {
    if (!m || !text || !n_out || (cap > 0 && !ids)) return set_error(ET_ERR_ARG, "et_tokenize: model, text, n_out (and ids when cap > 0) are required");
    ET_GUARD_BEGIN
    const std::vector<int32_t> v = tokenize(*m->m, text, add_bos != 0);
    *n_out = static_cast<int32_t>(v.size());
    for (int32_t i = 0; i < cap && i < static_cast<int32_t>(v.size()); ++i) ids[i] = v[i];
    return ET_OK;
    ET_GUARD_END
}

ET_API et_status et_token_text(const et_model* m, int32_t id, char* buf, int32_t cap, int32_t* n_out) {
    if (!m || !n_out || (cap > 0 && !buf)) return set_error(ET_ERR_ARG, "et_token_text: model and n_out are required");
    ET_GUARD_BEGIN
    const std::string s = token_text(*m->m, id);
    *n_out = static_cast<int32_t>(s.size());
    if (cap > 0) std::memcpy(buf, s.data(), std::min<size_t>(static_cast<size_t>(cap), s.size()));
    return ET_OK;
    ET_GUARD_END
}

ET_API et_status et_logits(et_model* m, const int32_t* ids, int32_t n_ids, const int32_t* positions, int32_t n_pos,
                           const int32_t* rows, int32_t n_rows, float* out) {
    if (!m || !ids || n_ids <= 0 || !positions || n_pos <= 0 || !out || (rows && n_rows <= 0))
        return set_error(ET_ERR_ARG, "et_logits: model, ids (n_ids > 0), positions (n_pos > 0) and out are required");
    ET_GUARD_BEGIN
    const Model& M = *m->m;
    const int64_t d = M.cfg.n_embd;
    et_batch b{ids, &n_ids, nullptr, nullptr, 1};
    std::vector<int32_t> tokens;
    int64_t T = 0;
    pad_batch(M, b, tokens, T);
    std::vector<int32_t> pos(static_cast<size_t>(n_pos));
    for (int32_t i = 0; i < n_pos; ++i) {
        const int32_t p = positions[i] < 0 ? positions[i] + n_ids : positions[i];
        if (p < 0 || p >= n_ids)
            return set_error(ET_ERR_ARG, "et_logits: position " + std::to_string(positions[i]) + " is outside the " +
                                             std::to_string(n_ids) + " tokens");
        pos[i] = p;
    }
    if (rows)
        for (int32_t i = 0; i < n_rows; ++i)
            if (rows[i] < 0 || rows[i] >= M.n_vocab)
                return set_error(ET_ERR_ARG, "et_logits: vocabulary row " + std::to_string(rows[i]) + " is out of range");
    std::vector<float> cos, sin, h(static_cast<size_t>(T * d));
    M.rope_tables(T, cos, sin);
    M.embed_rows(tokens.data(), T, h.data());
    run_layers(M, 0, M.n_layer, nullptr, h.data(), 1, T, cos.data(), sin.data(), nullptr);
    std::vector<float> sel(static_cast<size_t>(n_pos * d)), x(static_cast<size_t>(n_pos * d));
    for (int32_t i = 0; i < n_pos; ++i) std::memcpy(sel.data() + i * d, h.data() + pos[i] * d, sizeof(float) * d);
    rms_norm(sel.data(), n_pos, d, d, M.output_norm.data(), M.cfg.rms_eps, x.data());
    if (rows) {  // a few rows: fp32 dequantized, as Transformer.label_logits
        std::vector<float> r;
        M.output_rows_f32(rows, n_rows, r);
        for (int32_t i = 0; i < n_pos; ++i)
            for (int32_t c = 0; c < n_rows; ++c) {
                double s = 0;
                for (int64_t j = 0; j < d; ++j) s += static_cast<double>(x[i * d + j]) * r[c * d + j];
                out[static_cast<int64_t>(i) * n_rows + c] = static_cast<float>(s);
            }
    } else {     // the whole vocabulary: the int8-activation GEMM, as Transformer.head
        const QMatrix& w = M.tied ? M.embed.m : M.output.m;
        qgemm(x.data(), n_pos, w, Perturbation(), out);
    }
    return ET_OK;
    ET_GUARD_END
}

}  // extern "C"
