// capi_internal.h — the C API's C++ side: a bounds-checked GGUF reader, the model (weights as
// QMatrix views into the map + fp32 scales), its forward, the tokenizer, and the trainer.
// Errors are thrown as capi::Error(status, message) and turned into et_status at the boundary.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "edgetune/block.h"
#include "edgetune/edgetune.h"
#include "edgetune/qgemm.h"

namespace edgetune {
namespace capi {

struct Error : std::runtime_error {
    et_status status;
    Error(et_status s, const std::string& m) : std::runtime_error(m), status(s) {}
};

// ---- GGUF ---------------------------------------------------------------------------------
struct GGUFValue {
    enum Kind { INT, UINT, FLOAT, BOOL, STRING, ARRAY } kind = INT;
    int64_t i = 0;
    uint64_t u = 0;
    double f = 0;
    std::string s;
    std::vector<GGUFValue> arr;       // numeric arrays up to kMaxNumericArray elements
    std::vector<std::string> strs;    // string arrays (the vocabulary, merges)
    uint64_t count = 0;               // elements of an array (also of a longer numeric one, not kept)
    bool as_int(int64_t& out) const;
};

struct GGUFTensor {
    std::string name;
    uint32_t type = 0;
    std::vector<uint64_t> ne;   // ggml order: ne[0] = row length
    uint64_t offset = 0;        // absolute, in the file
    uint64_t nbytes = 0;
    const uint8_t* data = nullptr;
};

class GGUFFile {
  public:
    explicit GGUFFile(const std::string& path);  // throws Error (IO / FORMAT)
    ~GGUFFile();
    GGUFFile(const GGUFFile&) = delete;
    GGUFFile& operator=(const GGUFFile&) = delete;
    const GGUFValue* get(const std::string& key) const;
    void advise(uint64_t offset, uint64_t len, bool need) const;  // madvise WILLNEED / DONTNEED
    const GGUFTensor* tensor(const std::string& name) const;
    const std::string& path() const { return path_; }
    uint64_t size() const { return size_; }
    std::map<std::string, GGUFValue> kv;
    std::vector<GGUFTensor> tensors;

  private:
    std::string path_;
    const uint8_t* base_ = nullptr;
    uint64_t size_ = 0;
    std::unordered_map<std::string, size_t> index_;
};

// ---- model --------------------------------------------------------------------------------
struct QWeight {               // a layer matrix: codes in the map, scales/mins fp32 in RAM
    QMatrix m;
    std::vector<float> scales, mins;
    uint64_t tensor_id = 0;
    std::string name;
};

struct LayerW {
    QWeight w[BM_COUNT];
    std::vector<float> attn_norm, ffn_norm;
    std::vector<float> bias[3];  // qwen2 q/k/v biases (empty: none)
};

struct Tokenizer {
    std::vector<std::string> tokens;                       // byte-unicode strings (UTF-8)
    std::unordered_map<std::string, int32_t> ids;
    std::unordered_map<std::string, int32_t> merge_rank;   // "a b" -> rank
    int32_t bos = -1, eos = -1;
    bool add_bos = false;
    bool digits_split = false;                             // pre-tokenizer splits every digit
    bool ok = false;
    std::string why_not;
};

struct Model {
    std::unique_ptr<GGUFFile> file;
    BlockConfig cfg;
    int64_t n_layer = 0, n_vocab = 0, context_length = 2048;
    double rope_base = 10000.0, rope_scale = 1.0;
    std::vector<float> rope_freq_factors;
    QWeight embed, output;   // output: the embedding again when tied
    bool tied = false;
    std::vector<LayerW> layers;
    std::vector<float> output_norm;
    Tokenizer tok;
    uint64_t planned_bytes = 0;
    std::vector<bool> streamed;                                       // per layer
    int64_t n_streamed = 0;
    std::vector<std::vector<std::pair<uint64_t, uint64_t>>> layer_ranges;  // (file offset, bytes)
    void advise(int64_t layer, bool need) const;                      // no-op unless streamed

    // forward helpers
    void rope_tables(int64_t T, std::vector<float>& cos, std::vector<float>& sin) const;
    void embed_rows(const int32_t* ids, int64_t n, float* out) const;            // [n, d]
    void output_rows_f32(const int32_t* rows, int64_t n, std::vector<float>& out) const;
};

Model* load_model(const std::string& path, const et_model_options* opt);
std::vector<int32_t> tokenize(const Model& m, const std::string& text, bool add_bos);
std::string token_text(const Model& m, int32_t id);

// The per-pass description of what a layer reads (scale perturbations, perturbed norms, LoRA
// adapters as this pass sees them).
struct LayerPass {
    Perturbation p[BM_COUNT];
    LoraTerm lora[BM_COUNT];
    const float* attn_norm = nullptr;
    const float* ffn_norm = nullptr;
    const float* bias[3] = {nullptr, nullptr, nullptr};
};

// Embedding + layers [0, n_layer): h [B*T, d] right-padded tokens (pad id 0).
void pad_batch(const Model& m, const et_batch& b, std::vector<int32_t>& tokens, int64_t& T);
void run_layers(const Model& m, int64_t i0, int64_t i1, const LayerPass* passes, float* h, int64_t B,
                int64_t T, const float* cos, const float* sin, const std::atomic<bool>* cancel);

}  // namespace capi
}  // namespace edgetune

// the opaque handles
struct et_model {
    std::unique_ptr<edgetune::capi::Model> m;
};
