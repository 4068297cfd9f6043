// capi_gguf.cpp — a bounds-checked GGUF v2/v3 reader over a read-only mmap (the C API's twin of
// edgetune/formats/gguf_reader.py, with the same checks): every length and count read from the
// file is checked against the bytes that remain before it is used, so a truncated or hostile
// file is an Error naming the file and the problem, never a crash or a huge allocation.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "capi_internal.h"

namespace edgetune {
namespace capi {
namespace {

constexpr uint64_t MAX_KEY = 65535, MAX_NAME = 64, MAX_ALIGN = 1u << 20;
constexpr uint64_t MIN_KV = 8 + 1 + 4 + 1, MIN_TI = 8 + 1 + 4 + 8 + 4 + 8;

struct TypeInfo {
    const char* name;
    uint32_t blck, size;
};
bool type_info(uint32_t t, TypeInfo& out) {
    static const std::map<uint32_t, TypeInfo> k = {
        {0, {"F32", 1, 4}},       {1, {"F16", 1, 2}},        {2, {"Q4_0", 32, 18}},    {3, {"Q4_1", 32, 20}},
        {6, {"Q5_0", 32, 22}},    {7, {"Q5_1", 32, 24}},     {8, {"Q8_0", 32, 34}},    {9, {"Q8_1", 32, 40}},
        {10, {"Q2_K", 256, 84}},  {11, {"Q3_K", 256, 110}},  {12, {"Q4_K", 256, 144}}, {13, {"Q5_K", 256, 176}},
        {14, {"Q6_K", 256, 210}}, {15, {"Q8_K", 256, 292}},  {24, {"I8", 1, 1}},       {25, {"I16", 1, 2}},
        {26, {"I32", 1, 4}},      {27, {"I64", 1, 8}},       {28, {"F64", 1, 8}},      {30, {"BF16", 1, 2}}};
    auto it = k.find(t);
    if (it == k.end()) return false;
    out = it->second;
    return true;
}

struct Reader {
    const uint8_t* b;
    uint64_t size, pos = 0;
    const std::string& path;
    [[noreturn]] void fail(const std::string& what) const { throw Error(ET_ERR_FORMAT, path + ": " + what); }
    void need(uint64_t n, const std::string& what) const {
        if (n > size - pos)
            fail("truncated or corrupt: " + what + " at byte " + std::to_string(pos) + " needs " + std::to_string(n) +
                 " bytes but only " + std::to_string(size - pos) + " remain (file is " + std::to_string(size) +
                 " bytes)");
    }
    template <class T>
    T get(const std::string& what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, b + pos, sizeof(T));
        pos += sizeof(T);
        return v;
    }
    std::string str(const std::string& what, uint64_t max_len = UINT64_MAX) {
        const uint64_t at = pos;
        const uint64_t n = get<uint64_t>("length of " + what);
        if (n > max_len) fail(what + " at byte " + std::to_string(at) + " is " + std::to_string(n) + " bytes long");
        need(n, what);
        std::string s(reinterpret_cast<const char*>(b + pos), n);
        if (!valid_utf8(s)) fail(what + " at byte " + std::to_string(at) + " is not valid UTF-8");
        pos += n;
        return s;
    }
    static bool valid_utf8(const std::string& s) {
        for (size_t i = 0; i < s.size();) {
            const unsigned char c = static_cast<unsigned char>(s[i]);
            size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
            if (n == 0 || i + n > s.size()) return false;
            for (size_t k = 1; k < n; ++k)
                if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
            i += n;
        }
        return true;
    }
};

void read_value(Reader& r, uint32_t t, const std::string& key, GGUFValue& v, bool in_array) {
    switch (t) {
        case 0: v.kind = GGUFValue::UINT; v.u = r.get<uint8_t>(key); break;
        case 1: v.kind = GGUFValue::INT; v.i = r.get<int8_t>(key); break;
        case 2: v.kind = GGUFValue::UINT; v.u = r.get<uint16_t>(key); break;
        case 3: v.kind = GGUFValue::INT; v.i = r.get<int16_t>(key); break;
        case 4: v.kind = GGUFValue::UINT; v.u = r.get<uint32_t>(key); break;
        case 5: v.kind = GGUFValue::INT; v.i = r.get<int32_t>(key); break;
        case 6: v.kind = GGUFValue::FLOAT; v.f = r.get<float>(key); break;
        case 7: v.kind = GGUFValue::BOOL; v.u = r.get<uint8_t>(key) != 0; break;
        case 8: v.kind = GGUFValue::STRING; v.s = r.str("value of " + key); break;
        case 10: v.kind = GGUFValue::UINT; v.u = r.get<uint64_t>(key); break;
        case 11: v.kind = GGUFValue::INT; v.i = r.get<int64_t>(key); break;
        case 12: v.kind = GGUFValue::FLOAT; v.f = r.get<double>(key); break;
        case 9: {
            if (in_array) r.fail("metadata " + key + ": arrays of arrays are not supported");
            const uint32_t et = r.get<uint32_t>("element type of " + key);
            const uint64_t n = r.get<uint64_t>("element count of " + key);
            if (et > 12) r.fail("metadata " + key + ": unknown array element type " + std::to_string(et));
            static const uint64_t sz[13] = {1, 1, 2, 2, 4, 4, 4, 1, 8, 0, 8, 8, 8};  // min bytes each
            if (et == 9) r.fail("metadata " + key + ": arrays of arrays are not supported");
            if (n > (r.size - r.pos) / sz[et])
                r.fail("metadata " + key + ": array of " + std::to_string(n) + " elements cannot fit in the " +
                       std::to_string(r.size - r.pos) + " bytes left");
            v.kind = GGUFValue::ARRAY;
            v.count = n;
            if (et == 8) {  // strings: 32 bytes of RAM per >= 8 bytes of file
                v.strs.reserve(n);
                for (uint64_t i = 0; i < n; ++i) v.strs.push_back(r.str("element of " + key));
            } else if (n <= 4096) {
                v.arr.resize(n);
                for (uint64_t i = 0; i < n; ++i) read_value(r, et, key, v.arr[i], true);
            } else {        // a long numeric array (token types, scores): skipped, never needed here
                r.pos += n * sz[et];
            }
            break;
        }
        default: r.fail("metadata " + key + " has unknown value type " + std::to_string(t));
    }
}

}  // namespace

bool GGUFValue::as_int(int64_t& out) const {
    if (kind == INT) out = i;
    else if (kind == UINT && u <= static_cast<uint64_t>(INT64_MAX)) out = static_cast<int64_t>(u);
    else if (kind == BOOL) out = static_cast<int64_t>(u);
    else return false;
    return true;
}

GGUFFile::GGUFFile(const std::string& path) : path_(path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw Error(ET_ERR_IO, path + ": cannot open (" + std::strerror(errno) + ")");
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        throw Error(ET_ERR_IO, path + ": not a regular file");
    }
    size_ = static_cast<uint64_t>(st.st_size);
    if (size_ < 24) {
        ::close(fd);
        throw Error(ET_ERR_FORMAT, path + ": truncated: " + std::to_string(size_) +
                                       " bytes, shorter than the 24-byte GGUF header");
    }
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) throw Error(ET_ERR_IO, path + ": cannot map the file (" + std::strerror(errno) + ")");
    base_ = static_cast<const uint8_t*>(p);
    try {
        Reader r{base_, size_, 0, path_};
        if (std::memcmp(base_, "GGUF", 4) != 0) r.fail("not a GGUF file (bad magic bytes)");
        r.pos = 4;
        const uint32_t version = r.get<uint32_t>("version");
        if (version != 2 && version != 3)
            r.fail("unsupported GGUF version " + std::to_string(version) + " (edgetune reads versions 2 and 3)");
        const uint64_t n_tensors = r.get<uint64_t>("tensor count");
        const uint64_t n_kv = r.get<uint64_t>("metadata key/value count");
        const uint64_t room = size_ - r.pos;
        if (n_kv > room / MIN_KV) r.fail("corrupt header: metadata count " + std::to_string(n_kv) + " cannot fit");
        if (n_tensors > room / MIN_TI) r.fail("corrupt header: tensor count " + std::to_string(n_tensors) + " cannot fit");
        for (uint64_t i = 0; i < n_kv; ++i) {
            std::string key = r.str("metadata key #" + std::to_string(i), MAX_KEY);
            if (key.empty()) r.fail("metadata key #" + std::to_string(i) + " is empty");
            if (kv.count(key)) r.fail("duplicate metadata key '" + key + "'");
            const uint32_t t = r.get<uint32_t>("value type of " + key);
            read_value(r, t, key, kv[key], false);
        }
        uint64_t align = 32;
        if (const GGUFValue* a = get("general.alignment")) {
            int64_t v = 0;
            if (!a->as_int(v) || v < 1 || static_cast<uint64_t>(v) > MAX_ALIGN || (v & (v - 1)))
                r.fail("general.alignment is not a power of two between 1 and 1 MiB");
            align = static_cast<uint64_t>(v);
        }
        tensors.resize(n_tensors);
        for (uint64_t i = 0; i < n_tensors; ++i) {
            GGUFTensor& t = tensors[i];
            t.name = r.str("name of tensor #" + std::to_string(i), MAX_NAME);
            if (t.name.empty()) r.fail("tensor #" + std::to_string(i) + " has an empty name");
            if (index_.count(t.name)) r.fail("duplicate tensor name '" + t.name + "'");
            index_[t.name] = i;
            const uint32_t nd = r.get<uint32_t>("n_dims of tensor " + t.name);
            if (nd < 1 || nd > 4) r.fail("tensor '" + t.name + "' has " + std::to_string(nd) + " dimensions");
            uint64_t n_el = 1;
            for (uint32_t j = 0; j < nd; ++j) {
                const uint64_t d = r.get<uint64_t>("dimension of tensor " + t.name);
                if (d < 1) r.fail("tensor '" + t.name + "' has a zero dimension");
                if (n_el > size_ * 8 / d) r.fail("tensor '" + t.name + "' has more elements than the file could hold");
                n_el *= d;
                t.ne.push_back(d);
            }
            t.type = r.get<uint32_t>("type of tensor " + t.name);
            const uint64_t off = r.get<uint64_t>("data offset of tensor " + t.name);
            TypeInfo ti;
            if (!type_info(t.type, ti)) r.fail("tensor '" + t.name + "' has unknown ggml type id " + std::to_string(t.type));
            if (t.ne[0] % ti.blck)
                r.fail("tensor '" + t.name + "': row length " + std::to_string(t.ne[0]) + " is not a multiple of the " +
                       ti.name + " block size");
            t.nbytes = n_el / ti.blck * ti.size;
            if (off % align) r.fail("tensor '" + t.name + "': data offset is not a multiple of the alignment");
            t.offset = off;
        }
        const uint64_t start = (r.pos + align - 1) / align * align;
        for (GGUFTensor& t : tensors) {
            if (start > size_ || t.offset > size_ - start || t.nbytes > size_ - start - t.offset)
                r.fail("truncated or corrupt: tensor '" + t.name + "' data (bytes " + std::to_string(start + t.offset) +
                       ".." + std::to_string(start + t.offset + t.nbytes) + ") extends past the end of the file (" +
                       std::to_string(size_) + " bytes)");
            t.offset += start;
            t.data = base_ + t.offset;
        }
        std::vector<const GGUFTensor*> byoff;
        for (const GGUFTensor& t : tensors) byoff.push_back(&t);
        std::sort(byoff.begin(), byoff.end(), [](const GGUFTensor* a, const GGUFTensor* b) {
            return a->offset != b->offset ? a->offset < b->offset : a->nbytes < b->nbytes;
        });
        for (size_t i = 1; i < byoff.size(); ++i)
            if (byoff[i]->offset < byoff[i - 1]->offset + byoff[i - 1]->nbytes)
                r.fail("tensors '" + byoff[i - 1]->name + "' and '" + byoff[i]->name + "' overlap");
    } catch (...) {
        ::munmap(const_cast<uint8_t*>(base_), size_);
        base_ = nullptr;
        throw;
    }
}

GGUFFile::~GGUFFile() {
    if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
}

const GGUFValue* GGUFFile::get(const std::string& key) const {
    auto it = kv.find(key);
    return it == kv.end() ? nullptr : &it->second;
}

void GGUFFile::advise(uint64_t offset, uint64_t len, bool need) const {
    if (!base_ || offset >= size_) return;
    len = std::min(len, size_ - offset);
    ::madvise(const_cast<uint8_t*>(base_) + offset, len, need ? MADV_WILLNEED : MADV_DONTNEED);
}

const GGUFTensor* GGUFFile::tensor(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors[it->second];
}

}  // namespace capi
}  // namespace edgetune
