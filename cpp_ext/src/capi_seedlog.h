// capi_seedlog.h — the seed log of edgetune/zo/seedlog.py from C++: canonical JSON exactly as
// Python's json.dumps(sort_keys=True, separators=(",", ":")) writes it (floats as Python's repr),
// CRC32 as zlib.crc32, the same flush/fsync policy; plus the small JSON reader resume needs, and
// an .npz writer for the trained state (numpy's format, read by edgetune.runlog.load_snapshot).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace edgetune {
namespace capi {

uint32_t crc32(const void* data, size_t n, uint32_t crc = 0);
std::string py_float(double v);        // repr(float(v)), e.g. 1e-05, 0.0001, 3.0, NaN, Infinity
std::string json_string(const std::string& s);  // json.dumps(s) with ensure_ascii=True

// A JSON value as canonical text builders use: objects are std::map (sorted keys, as sort_keys).
struct Json {
    enum Kind { NUL, BOOL, NUM, STR, ARR, OBJ } kind = NUL;
    bool b = false;
    std::string num;                          // the number's text (ints and floats as written)
    std::string s;
    std::vector<Json> arr;
    std::map<std::string, Json> obj;
    static Json integer(int64_t v);
    static Json uinteger(uint64_t v);
    static Json real(double v);
    static Json str(const std::string& v);
    static Json array();
    static Json object();
    std::string dump() const;                 // canonical text
    double as_double() const;
    const Json* get(const std::string& k) const;
};

// Parses one JSON text; false on a syntax error.  For a top-level object, members[i] holds the
// raw text span of each "key":value member (to recompute the CRC without the crc member).
bool json_parse(const std::string& text, Json& out, std::vector<std::pair<std::string, std::string>>* members);

// "<canonical JSON of rec with crc>\n" (seedlog.encode_record)
std::string encode_record(const Json& rec);
// a record, or false if the line is torn/corrupt (seedlog.decode_line)
bool decode_line(const std::string& line, Json& rec);

class SeedLogWriter {
  public:
    // Opens path for appending after truncating it to valid_bytes; writes header if given.
    SeedLogWriter(const std::string& path, uint64_t valid_bytes, const Json* header, int fsync_every);
    ~SeedLogWriter();
    void append(const Json& rec);
    void sync();
    const std::string& path() const { return path_; }

  private:
    void write(const std::string& data, bool force_sync);
    std::string path_;
    int fd_ = -1, fsync_every_ = 10, pending_ = 0;
};

// (header, records, valid_bytes) of an existing log (seedlog.read_log); throws Error on a second
// header or records without one.
struct LogContents {
    bool has_header = false;
    Json header;
    std::vector<Json> records;
    uint64_t valid = 0;
    bool exists = false;
};
LogContents read_log(const std::string& path);

// numpy .npz (stored zip of .npy files), written atomically: path.tmp, fsync, rename, fsync dir.
struct NpyArray {
    std::string name;
    std::vector<int64_t> shape;
    const float* f32 = nullptr;   // float32 data, or
    int64_t i64 = 0;              // an int64 scalar when f32 is null
};
void write_npz(const std::string& path, const std::vector<NpyArray>& arrays);

}  // namespace capi
}  // namespace edgetune
