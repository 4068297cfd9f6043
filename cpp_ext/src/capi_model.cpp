// capi_model.cpp — the C API's model: llama-family weights from a GGUF (layer matrices as QMatrix
// views of the mapped codes + fp32 scales, exactly as edgetune/formats/gguf_reader.py converts
// them), the memory plan, the forward over the C++ block kernels (block.h), and the byte-level
// BPE tokenizer.
#include <algorithm>
#include <cmath>
#include <cstring>

#include <unistd.h>

#include "capi_internal.h"

namespace edgetune {
namespace capi {
namespace {

float half_to_float(uint16_t h) {
    const uint32_t sign = (h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) {
                mant <<= 1;
                --exp;
            }
            mant &= 0x3FF;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

[[noreturn]] void fail(const GGUFFile& g, et_status s, const std::string& m) { throw Error(s, g.path() + ": " + m); }

const GGUFTensor& need_tensor(const GGUFFile& g, const std::string& name) {
    const GGUFTensor* t = g.tensor(name);
    if (!t) fail(g, ET_ERR_FORMAT, "missing tensor '" + name + "'");
    return *t;
}

std::vector<float> read_vector(const GGUFFile& g, const std::string& name, int64_t n) {
    const GGUFTensor& t = need_tensor(g, name);
    uint64_t count = 1;
    for (uint64_t d : t.ne) count *= d;
    if (static_cast<int64_t>(count) != n)
        fail(g, ET_ERR_FORMAT, "tensor '" + name + "' has " + std::to_string(count) + " values, expected " + std::to_string(n));
    std::vector<float> v(static_cast<size_t>(n));
    if (t.type == 0) {
        std::memcpy(v.data(), t.data, sizeof(float) * n);
    } else if (t.type == 1) {
        for (int64_t i = 0; i < n; ++i) {
            uint16_t h;
            std::memcpy(&h, t.data + 2 * i, 2);
            v[i] = half_to_float(h);
        }
    } else {
        fail(g, ET_ERR_UNSUPPORTED, "tensor '" + name + "' must be F32 or F16");
    }
    return v;
}

// A Q4_0 / Q4_1 / Q8_0 matrix [N, K] in edgetune's QMatrix layout (quant.py): codes stay in the
// map, the fp16 block scales (and mins) become fp32 arrays.
void read_qweight(const GGUFFile& g, const std::string& name, int64_t N, int64_t K, uint64_t tensor_id, QWeight& q) {
    const GGUFTensor& t = need_tensor(g, name);
    if (t.ne.size() != 2 || static_cast<int64_t>(t.ne[0]) != K || static_cast<int64_t>(t.ne[1]) != N)
        fail(g, ET_ERR_FORMAT, "tensor '" + name + "' has the wrong shape (expected [" + std::to_string(N) + ", " +
                                   std::to_string(K) + "])");
    int bsize, code_off, bits, offset;
    bool has_min;
    switch (t.type) {
        case 2: bsize = 18; code_off = 2; bits = 4; offset = 8; has_min = false; break;   // Q4_0
        case 3: bsize = 20; code_off = 4; bits = 4; offset = 0; has_min = true; break;    // Q4_1
        case 8: bsize = 34; code_off = 2; bits = 8; offset = 0; has_min = false; break;   // Q8_0
        default:
            fail(g, ET_ERR_UNSUPPORTED, "tensor '" + name + "' has ggml type " + std::to_string(t.type) +
                                            "; the C API reads Q4_0, Q4_1 and Q8_0 matrices (convert with "
                                            "`edgetune convert` or llama.cpp's quantize)");
    }
    const int64_t G = K / 32;
    q.name = name;
    q.tensor_id = tensor_id;
    q.scales.resize(static_cast<size_t>(N * G));
    if (has_min) q.mins.resize(static_cast<size_t>(N * G));
    for (int64_t n = 0; n < N; ++n)
        for (int64_t b = 0; b < G; ++b) {
            const uint8_t* blk = t.data + (n * G + b) * bsize;
            uint16_t h;
            std::memcpy(&h, blk, 2);
            q.scales[n * G + b] = half_to_float(h);
            if (has_min) {
                std::memcpy(&h, blk + 2, 2);
                q.mins[n * G + b] = half_to_float(h);
            }
        }
    QMatrix& m = q.m;
    m.bits = bits;
    m.codes = t.data + code_off;
    m.N = N;
    m.K = K;
    m.group = 32;
    m.row_stride = G * bsize;
    m.block_stride = bsize;
    m.scales = q.scales.data();
    m.mins = has_min ? q.mins.data() : nullptr;
    m.offset = offset;
}

int64_t meta_int(const GGUFFile& g, const std::string& key, int64_t dflt, bool required) {
    const GGUFValue* v = g.get(key);
    if (!v) {
        if (required) fail(g, ET_ERR_FORMAT, "missing metadata key '" + key + "'");
        return dflt;
    }
    int64_t out;
    if (!v->as_int(out)) fail(g, ET_ERR_FORMAT, "metadata '" + key + "' is not an integer");
    return out;
}

double meta_float(const GGUFFile& g, const std::string& key, double dflt) {
    const GGUFValue* v = g.get(key);
    if (!v) return dflt;
    if (v->kind == GGUFValue::FLOAT) return v->f;
    int64_t i;
    if (v->as_int(i)) return static_cast<double>(i);
    fail(g, ET_ERR_FORMAT, "metadata '" + key + "' is not a number");
}

// ---- tokenizer --------------------------------------------------------------------------------
std::string utf8(uint32_t cp) {
    std::string s;
    if (cp < 0x80) {
        s += static_cast<char>(cp);
    } else if (cp < 0x800) {
        s += static_cast<char>(0xC0 | (cp >> 6));
        s += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
        s += static_cast<char>(0xE0 | (cp >> 12));
        s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        s += static_cast<char>(0x80 | (cp & 0x3F));
    }
    return s;
}

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 + n.
struct ByteMap {
    std::string enc[256];
    std::unordered_map<std::string, uint8_t> dec;
    ByteMap() {
        int n = 0;
        for (int b = 0; b < 256; ++b) {
            const bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            enc[b] = utf8(keep ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++));
            dec[enc[b]] = static_cast<uint8_t>(b);
        }
    }
};
const ByteMap& byte_map() {
    static const ByteMap m;
    return m;
}

bool is_space(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'; }
bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
bool is_letter(unsigned char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80; }
bool is_other(unsigned char c) { return !is_space(c) && !is_digit(c) && !is_letter(c); }

// GPT-2's pre-tokenizer regex on [b, e):
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
void gpt2_split(const std::string& s, size_t b, size_t e, std::vector<std::string>& out) {
    size_t i = b;
    auto run = [&](size_t j, bool (*cls)(unsigned char)) {
        while (j < e && cls(static_cast<unsigned char>(s[j]))) ++j;
        return j;
    };
    while (i < e) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        if (c == '\'' && i + 1 < e) {
            static const char* cs[] = {"re", "ve", "ll", "s", "t", "m", "d"};
            bool hit = false;
            for (const char* k : cs) {
                const size_t n = std::strlen(k);
                if (i + 1 + n <= e && s.compare(i + 1, n, k) == 0) {
                    out.push_back(s.substr(i, 1 + n));
                    i += 1 + n;
                    hit = true;
                    break;
                }
            }
            if (hit) continue;
        }
        const size_t k = (c == ' ' && i + 1 < e) ? i + 1 : i;  // the optional leading space
        const unsigned char d = static_cast<unsigned char>(s[k]);
        bool (*cls)(unsigned char) = nullptr;
        if (is_letter(d)) cls = is_letter;
        else if (is_digit(d)) cls = is_digit;
        else if (is_other(d)) cls = is_other;
        if (cls && (k == i + 1 || cls(c))) {
            const size_t j = run(k, cls);
            out.push_back(s.substr(i, j - i));
            i = j;
            continue;
        }
        // whitespace
        const size_t j = run(i, [](unsigned char x) { return is_space(x); });
        size_t len = j - i;
        if (j < e && len >= 2) len -= 1;  // \s+(?!\S): leave the last one to the next token
        if (len == 0) len = 1;
        out.push_back(s.substr(i, len));
        i += len;
    }
}

void bpe(const Tokenizer& tk, const std::string& frag, std::vector<int32_t>& out) {
    const ByteMap& bm = byte_map();
    std::vector<std::string> sym;
    for (unsigned char c : frag) sym.push_back(bm.enc[c]);
    while (sym.size() > 1) {
        int best = -1;
        int32_t best_rank = INT32_MAX;
        for (size_t i = 0; i + 1 < sym.size(); ++i) {
            auto it = tk.merge_rank.find(sym[i] + " " + sym[i + 1]);
            if (it != tk.merge_rank.end() && it->second < best_rank) {
                best_rank = it->second;
                best = static_cast<int>(i);
            }
        }
        if (best < 0) break;
        sym[best] += sym[best + 1];
        sym.erase(sym.begin() + best + 1);
    }
    for (const std::string& s : sym) {
        auto it = tk.ids.find(s);
        if (it != tk.ids.end()) {
            out.push_back(it->second);
            continue;
        }
        for (size_t i = 0; i < s.size();) {  // unknown merge result: fall back to its bytes
            size_t n = 1;
            const unsigned char c = static_cast<unsigned char>(s[i]);
            if (c >= 0xC0) n = c >= 0xE0 ? 3 : 2;
            auto jt = tk.ids.find(s.substr(i, n));
            if (jt != tk.ids.end()) out.push_back(jt->second);
            i += n;
        }
    }
}

void load_tokenizer(const GGUFFile& g, Tokenizer& tk, int64_t n_vocab) {
    const GGUFValue* model = g.get("tokenizer.ggml.model");
    const GGUFValue* toks = g.get("tokenizer.ggml.tokens");
    const GGUFValue* merges = g.get("tokenizer.ggml.merges");
    if (!model || model->kind != GGUFValue::STRING || model->s != "gpt2" || !toks || !merges ||
        toks->kind != GGUFValue::ARRAY || merges->kind != GGUFValue::ARRAY) {
        tk.why_not = "the file has no byte-level BPE (gpt2) vocabulary with merges";
        return;
    }
    if (toks->strs.size() != toks->count || toks->count == 0 || merges->strs.size() != merges->count) {
        tk.why_not = "tokenizer.ggml.tokens / merges are not arrays of strings";
        return;
    }
    for (size_t i = 0; i < toks->strs.size(); ++i) {
        tk.tokens.push_back(toks->strs[i]);
        tk.ids.emplace(toks->strs[i], static_cast<int32_t>(i));
    }
    for (size_t i = 0; i < merges->strs.size(); ++i) tk.merge_rank.emplace(merges->strs[i], static_cast<int32_t>(i));
    tk.bos = static_cast<int32_t>(meta_int(g, "tokenizer.ggml.bos_token_id", -1, false));
    tk.eos = static_cast<int32_t>(meta_int(g, "tokenizer.ggml.eos_token_id", -1, false));
    if (tk.bos >= n_vocab) tk.bos = -1;
    if (tk.eos >= n_vocab) tk.eos = -1;
    tk.add_bos = meta_int(g, "tokenizer.ggml.add_bos_token", 0, false) != 0;
    const GGUFValue* pre = g.get("tokenizer.ggml.pre");
    const std::string p = pre && pre->kind == GGUFValue::STRING ? pre->s : "default";
    // llama.cpp's pre-tokenizers that split every digit before GPT-2's regex
    for (const char* d : {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
        if (p == d) tk.digits_split = true;
    tk.ok = true;
}

}  // namespace

std::vector<int32_t> tokenize(const Model& m, const std::string& text, bool add_bos) {
    const Tokenizer& tk = m.tok;
    if (!tk.ok) throw Error(ET_ERR_UNSUPPORTED, m.file->path() + ": cannot tokenize: " + tk.why_not);
    std::vector<int32_t> out;
    if (add_bos && tk.bos >= 0) out.push_back(tk.bos);
    std::vector<std::string> frags;
    size_t i = 0;
    while (i < text.size()) {  // \p{N} first (digits one by one), GPT-2's regex on the rest
        if (tk.digits_split && is_digit(static_cast<unsigned char>(text[i]))) {
            frags.push_back(text.substr(i, 1));
            ++i;
            continue;
        }
        size_t j = i;
        while (j < text.size() && !(tk.digits_split && is_digit(static_cast<unsigned char>(text[j])))) ++j;
        gpt2_split(text, i, j, frags);
        i = j;
    }
    for (const std::string& f : frags) bpe(tk, f, out);
    return out;
}

std::string token_text(const Model& m, int32_t id) {
    if (!m.tok.ok) throw Error(ET_ERR_UNSUPPORTED, m.file->path() + ": no vocabulary: " + m.tok.why_not);
    if (id < 0 || id >= static_cast<int32_t>(m.tok.tokens.size()))
        throw Error(ET_ERR_ARG, "token id " + std::to_string(id) + " is out of range");
    const std::string& s = m.tok.tokens[id];
    const ByteMap& bm = byte_map();
    std::string out;
    for (size_t i = 0; i < s.size();) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        const size_t n = c >= 0xE0 ? 3 : (c >= 0xC0 ? 2 : 1);
        auto it = bm.dec.find(s.substr(i, n));
        if (it != bm.dec.end()) out += static_cast<char>(it->second);
        else out += s.substr(i, n);
        i += n;
    }
    return out;
}

Model* load_model(const std::string& path, const et_model_options* opt) {
    std::unique_ptr<Model> mp(new Model);
    Model& m = *mp;
    m.file.reset(new GGUFFile(path));
    const GGUFFile& g = *m.file;
    const GGUFValue* arch = g.get("general.architecture");
    if (!arch || arch->kind != GGUFValue::STRING) fail(g, ET_ERR_FORMAT, "missing metadata key 'general.architecture'");
    const std::string a = arch->s;
    if (a != "llama" && a != "mistral" && a != "qwen2")
        fail(g, ET_ERR_UNSUPPORTED, "architecture '" + a + "' is not supported (supported: llama, mistral, qwen2)");
    BlockConfig& c = m.cfg;
    c.n_embd = meta_int(g, a + ".embedding_length", 0, true);
    c.n_head = meta_int(g, a + ".attention.head_count", 0, true);
    c.n_head_kv = meta_int(g, a + ".attention.head_count_kv", c.n_head, false);
    c.n_ff = meta_int(g, a + ".feed_forward_length", 0, true);
    m.n_layer = meta_int(g, a + ".block_count", 0, true);
    if (c.n_embd <= 0 || c.n_head <= 0 || c.n_head_kv <= 0 || c.n_ff <= 0 || m.n_layer <= 0 || c.n_embd % c.n_head ||
        c.n_head % c.n_head_kv || c.n_embd % 32 || c.n_ff % 32 || m.n_layer > 4096 || c.n_embd > (1 << 20) ||
        c.n_ff > (1 << 22))
        fail(g, ET_ERR_FORMAT, "inconsistent model shape in the metadata");
    c.head_dim = c.n_embd / c.n_head;
    c.rope_dim = meta_int(g, a + ".rope.dimension_count", c.head_dim, false);
    if (c.rope_dim <= 0 || c.rope_dim > c.head_dim || c.rope_dim % 2) fail(g, ET_ERR_FORMAT, "bad rope.dimension_count");
    c.neox = a == "qwen2";
    c.rms_eps = static_cast<float>(meta_float(g, a + ".attention.layer_norm_rms_epsilon", 1e-5));
    c.attn_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));
    m.rope_base = meta_float(g, a + ".rope.freq_base", 10000.0);
    const GGUFValue* sc = g.get(a + ".rope.scaling.type");
    if (sc && sc->kind == GGUFValue::STRING && sc->s != "none") {
        if (sc->s != "linear") fail(g, ET_ERR_UNSUPPORTED, "RoPE scaling '" + sc->s + "' is not supported (none, linear)");
        m.rope_scale = meta_float(g, a + ".rope.scaling.factor", 1.0);
        if (!(m.rope_scale > 0)) m.rope_scale = 1.0;
    }
    m.context_length = meta_int(g, a + ".context_length", 2048, false);
    const GGUFTensor& emb = need_tensor(g, "token_embd.weight");
    if (emb.ne.size() != 2) fail(g, ET_ERR_FORMAT, "token_embd.weight is not a matrix");
    m.n_vocab = meta_int(g, a + ".vocab_size", static_cast<int64_t>(emb.ne[1]), false);
    if (m.n_vocab <= 0 || static_cast<uint64_t>(m.n_vocab) != emb.ne[1])
        fail(g, ET_ERR_FORMAT, "token_embd.weight has " + std::to_string(emb.ne[1]) + " rows, expected the vocabulary size");
    // tensor ids in edgetune's order (model/transformer.py): the embedding, then each layer's
    // seven matrices in LAYER_WEIGHTS order, then output.weight
    // reading a matrix's block scales touches every page of it: give the pages back right away
    // (a layer is faulted in again when it runs), so opening never holds the whole file
    const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    auto drop = [&](const std::string& name) {
        const GGUFTensor* t = g.tensor(name);
        const uint64_t lo = (t->offset + page - 1) / page * page, hi = (t->offset + t->nbytes) / page * page;
        if (hi > lo) g.advise(lo, hi - lo, false);
    };
    uint64_t tid = 0;
    read_qweight(g, "token_embd.weight", m.n_vocab, c.n_embd, tid++, m.embed);
    drop("token_embd.weight");
    static const char* names[BM_COUNT] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
    const int64_t kv = c.n_head_kv * c.head_dim;
    const int64_t shape[BM_COUNT][2] = {{c.n_embd, c.n_embd}, {kv, c.n_embd},   {kv, c.n_embd}, {c.n_embd, c.n_embd},
                                        {c.n_ff, c.n_embd},   {c.n_ff, c.n_embd}, {c.n_embd, c.n_ff}};
    m.layers.resize(static_cast<size_t>(m.n_layer));
    const bool bias = g.tensor("blk.0.attn_q.bias") != nullptr;
    for (int64_t i = 0; i < m.n_layer; ++i) {
        LayerW& L = m.layers[i];
        const std::string p = "blk." + std::to_string(i) + ".";
        for (int j = 0; j < BM_COUNT; ++j) {
            read_qweight(g, p + names[j] + ".weight", shape[j][0], shape[j][1], tid++, L.w[j]);
            drop(p + names[j] + ".weight");
        }
        L.attn_norm = read_vector(g, p + "attn_norm.weight", c.n_embd);
        L.ffn_norm = read_vector(g, p + "ffn_norm.weight", c.n_embd);
        if (bias)
            for (int j = 0; j < 3; ++j) L.bias[j] = read_vector(g, p + names[j] + ".bias", shape[j][0]);
    }
    m.output_norm = read_vector(g, "output_norm.weight", c.n_embd);
    m.tied = g.tensor("output.weight") == nullptr;
    if (!m.tied) {
        read_qweight(g, "output.weight", m.n_vocab, c.n_embd, tid++, m.output);
        drop("output.weight");
    }
    if (const GGUFTensor* rf = g.tensor("rope_freqs.weight")) {
        (void)rf;
        m.rope_freq_factors = read_vector(g, "rope_freqs.weight", c.rope_dim / 2);
    }
    load_tokenizer(g, m.tok, m.n_vocab);
    for (const char* k : {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"}) {  // copied into m.tok
        auto it = m.file->kv.find(k);
        if (it != m.file->kv.end()) std::vector<std::string>().swap(it->second.strs);
    }

    // the memory plan (as memory/budget.py, simplified): fixed costs (fp32 scales/mins, the
    // embedding/output and every non-layer tensor mapped, activations of the largest batch) plus
    // the layer matrices' codes.  Over the budget, layers are streamed from the map bottom-up
    // (the frozen prefix runs once per step): their pages are prefetched before use and dropped
    // after (madvise), so two streamed layers are resident at a time.
    const int64_t S = opt && opt->max_seq > 0 ? opt->max_seq : 256;
    const int64_t Bm = opt && opt->max_batch > 0 ? opt->max_batch : 16;
    uint64_t mapped = 0, scales = 0;
    for (const GGUFTensor& t : g.tensors) mapped += t.nbytes;
    auto add = [&](const QWeight& q) { scales += 4 * (q.scales.size() + q.mins.size()); };
    add(m.embed);
    if (!m.tied) add(m.output);
    for (const LayerW& L : m.layers)
        for (const QWeight& q : L.w) add(q);
    m.layer_ranges.assign(static_cast<size_t>(m.n_layer), {});
    std::vector<uint64_t> layer_bytes(static_cast<size_t>(m.n_layer), 0);
    for (int64_t i = 0; i < m.n_layer; ++i)
        for (int j = 0; j < BM_COUNT; ++j) {
            const GGUFTensor* t = g.tensor(m.layers[i].w[j].name);
            m.layer_ranges[i].push_back({t->offset, t->nbytes});
            layer_bytes[i] += t->nbytes;
        }
    uint64_t all_layers = 0, max_layer = 0;
    for (uint64_t b : layer_bytes) {
        all_layers += b;
        max_layer = std::max(max_layer, b);
    }
    const uint64_t M = static_cast<uint64_t>(Bm * S);
    const uint64_t act = 4 * M * static_cast<uint64_t>(6 * c.n_embd + 2 * kv + 3 * c.n_ff) +  // block arena
                         4 * M * static_cast<uint64_t>(c.n_embd) * 3;                            // passes' states
    const uint64_t fixed = (mapped - all_layers) + scales + act;
    m.streamed.assign(static_cast<size_t>(m.n_layer), false);
    m.planned_bytes = fixed + all_layers;
    const uint64_t budget = opt ? opt->memory_budget : 0;
    if (budget && m.planned_bytes > budget) {
        const uint64_t minimum = fixed + 2 * max_layer;
        if (minimum > budget)
            throw Error(ET_ERR_BUDGET,
                        path + ": the model needs at least " + std::to_string((minimum + (1 << 20) - 1) >> 20) +
                            " MiB with every layer streamed (" + std::to_string((mapped - all_layers) >> 20) +
                            " MiB embedding/output/norms, " + std::to_string(scales >> 20) + " MiB fp32 scales, " +
                            std::to_string(act >> 20) + " MiB activations for batch " + std::to_string(Bm) + " x " +
                            std::to_string(S) + " tokens, 2 layers of " + std::to_string(max_layer >> 20) +
                            " MiB in flight) but the budget is " + std::to_string(budget >> 20) + " MiB");
        uint64_t resident = all_layers;
        for (int64_t i = 0; i < m.n_layer && fixed + resident + 2 * max_layer > budget; ++i) {
            m.streamed[i] = true;
            resident -= layer_bytes[i];
            ++m.n_streamed;
        }
        m.planned_bytes = fixed + resident + 2 * max_layer;
    }
    return mp.release();
}

void Model::rope_tables(int64_t T, std::vector<float>& cos, std::vector<float>& sin) const {
    const int64_t h = cfg.rope_dim / 2;
    cos.resize(static_cast<size_t>(T * h));
    sin.resize(static_cast<size_t>(T * h));
    for (int64_t i = 0; i < h; ++i) {
        double inv = 1.0 / std::pow(rope_base, static_cast<double>(2 * i) / static_cast<double>(cfg.rope_dim));
        if (!rope_freq_factors.empty()) inv = inv / static_cast<double>(rope_freq_factors[i]);
        for (int64_t t = 0; t < T; ++t) {
            const double ang = (static_cast<double>(t) / rope_scale) * inv;
            cos[t * h + i] = static_cast<float>(std::cos(ang));
            sin[t * h + i] = static_cast<float>(std::sin(ang));
        }
    }
}

// as quant.dequantize_rows: fp32 (q - offset) * s (+ m)
void Model::embed_rows(const int32_t* ids, int64_t n, float* out) const {
    const QMatrix& w = embed.m;
    const int64_t G = w.K / 32;
    for (int64_t r = 0; r < n; ++r) {
        const int64_t row = ids[r];
        float* o = out + r * w.K;
        for (int64_t b = 0; b < G; ++b) {
            const uint8_t* blk = w.block(row, b);
            const float s = w.scales[row * G + b];
            const float mn = w.mins ? w.mins[row * G + b] : 0.0f;
            for (int j = 0; j < 32; ++j) {
                float q;
                if (w.bits == 4) q = static_cast<float>(j < 16 ? (blk[j] & 0x0F) : (blk[j - 16] >> 4)) - static_cast<float>(w.offset);
                else q = static_cast<float>(static_cast<int8_t>(blk[j]));
                float v = q * s;
                if (w.mins) v = v + mn;
                o[b * 32 + j] = v;
            }
        }
    }
}

void Model::output_rows_f32(const int32_t* rows, int64_t n, std::vector<float>& out) const {
    out.resize(static_cast<size_t>(n * cfg.n_embd));
    if (tied) {
        embed_rows(rows, n, out.data());
        return;
    }
    const QMatrix& w = output.m;  // dequantized exactly as embed_rows does
    const int64_t G = w.K / 32;
    for (int64_t r = 0; r < n; ++r)
        for (int64_t b = 0; b < G; ++b) {
            const uint8_t* blk = w.block(rows[r], b);
            const float s = w.scales[rows[r] * G + b];
            const float mn = w.mins ? w.mins[rows[r] * G + b] : 0.0f;
            for (int j = 0; j < 32; ++j) {
                float q;
                if (w.bits == 4) q = static_cast<float>(j < 16 ? (blk[j] & 0x0F) : (blk[j - 16] >> 4)) - static_cast<float>(w.offset);
                else q = static_cast<float>(static_cast<int8_t>(blk[j]));
                float v = q * s;
                if (w.mins) v = v + mn;
                out[r * w.K + b * 32 + j] = v;
            }
        }
}

void pad_batch(const Model& m, const et_batch& b, std::vector<int32_t>& tokens, int64_t& T) {
    if (!b.ids || !b.lengths || b.batch <= 0) throw Error(ET_ERR_ARG, "batch: ids, lengths and batch > 0 are required");
    T = 0;
    for (int32_t i = 0; i < b.batch; ++i) {
        if (b.lengths[i] <= 0) throw Error(ET_ERR_ARG, "batch: sequence " + std::to_string(i) + " is empty");
        T = std::max<int64_t>(T, b.lengths[i]);
    }
    if (T > m.context_length)
        throw Error(ET_ERR_ARG, "batch: a sequence of " + std::to_string(T) + " tokens exceeds the context length " +
                                    std::to_string(m.context_length));
    tokens.assign(static_cast<size_t>(b.batch * T), 0);  // right padding with id 0: the causal mask suffices
    int64_t o = 0;
    for (int32_t i = 0; i < b.batch; ++i) {
        for (int32_t t = 0; t < b.lengths[i]; ++t) {
            const int32_t id = b.ids[o + t];
            if (id < 0 || id >= m.n_vocab)
                throw Error(ET_ERR_ARG, "batch: token id " + std::to_string(id) + " out of range 0.." +
                                            std::to_string(m.n_vocab - 1));
            tokens[i * T + t] = id;
        }
        o += b.lengths[i];
    }
}

void Model::advise(int64_t layer, bool need) const {
    if (layer < 0 || layer >= n_layer || !streamed[layer]) return;
    const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    for (const auto& r : layer_ranges[layer]) {
        // whole pages inside the tensor only: a page shared with a resident neighbour stays
        const uint64_t lo = need ? r.first / page * page : (r.first + page - 1) / page * page;
        const uint64_t hi = need ? r.first + r.second : (r.first + r.second) / page * page;
        if (hi > lo) file->advise(lo, hi - lo, need);
    }
}

void run_layers(const Model& m, int64_t i0, int64_t i1, const LayerPass* passes, float* h, int64_t B, int64_t T,
                const float* cos, const float* sin, const std::atomic<bool>* cancel) {
    if (i0 < i1) m.advise(i0, true);
    for (int64_t i = i0; i < i1; ++i) {
        if (cancel && cancel->load()) throw Error(ET_ERR_CANCELLED, "the step was cancelled");
        m.advise(i + 1, true);   // a streamed layer's pages are read ahead while this one computes
        const LayerW& L = m.layers[i];
        BlockWeights w;
        for (int j = 0; j < BM_COUNT; ++j) {
            w.w[j] = L.w[j].m;
            if (passes) {
                w.p[j] = passes[i].p[j];
                w.lora[j] = passes[i].lora[j];
            }
        }
        w.attn_norm = passes && passes[i].attn_norm ? passes[i].attn_norm : L.attn_norm.data();
        w.ffn_norm = passes && passes[i].ffn_norm ? passes[i].ffn_norm : L.ffn_norm.data();
        for (int j = 0; j < 3; ++j)
            w.bias[j] = passes && passes[i].bias[j] ? passes[i].bias[j] : (L.bias[j].empty() ? nullptr : L.bias[j].data());
        block_forward(m.cfg, w, h, h, B, T, cos, sin);
        m.advise(i, false);      // and given back after use
    }
}

}  // namespace capi
}  // namespace edgetune
