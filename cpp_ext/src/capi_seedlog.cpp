// capi_seedlog.cpp — seed log, canonical JSON and .npz for the C API (see capi_seedlog.h).
#include "capi_seedlog.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "capi_internal.h"

namespace edgetune {
namespace capi {

uint32_t crc32(const void* data, size_t n, uint32_t crc) {
    static uint32_t table[256];
    static bool init = [] {
        for (uint32_t i = 0; i < 256; ++i) {
            uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
        return true;
    }();
    (void)init;
    const uint8_t* p = static_cast<const uint8_t*>(data);
    crc = ~crc;
    for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

// Python's repr(float): the shortest digits that round-trip; positional notation when the
// decimal exponent is in [-4, 16), else d.ddde+XX.
std::string py_float(double v) {
    if (std::isnan(v)) return "NaN";
    if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
    if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
    char buf[64];
    auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
    std::string s(buf, r.ptr);
    std::string sign;
    if (s[0] == '-') {
        sign = "-";
        s = s.substr(1);
    }
    const size_t e = s.find('e');
    std::string digits = s.substr(0, 1) + (e > 1 ? s.substr(2, e - 2) : "");
    const int exp = std::atoi(s.c_str() + e + 1);
    while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
    std::string out;
    if (exp >= -4 && exp < 16) {
        if (exp >= 0) {
            if (static_cast<int>(digits.size()) <= exp + 1) {
                out = digits + std::string(exp + 1 - digits.size(), '0') + ".0";
            } else {
                out = digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
            }
        } else {
            out = "0." + std::string(-exp - 1, '0') + digits;
        }
    } else {
        out = digits.substr(0, 1);
        if (digits.size() > 1) out += "." + digits.substr(1);
        char eb[16];
        std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
        out += eb;
    }
    return sign + out;
}

std::string json_string(const std::string& s) {
    std::string o = "\"";
    char buf[16];
    for (size_t i = 0; i < s.size();) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        uint32_t cp = c;
        size_t n = 1;
        if (c >= 0x80) {  // decode UTF-8 (invalid bytes pass as U+FFFD, as errors='replace' would)
            n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
            if (n == 1 || i + n > s.size()) {
                cp = 0xFFFD;
                n = 1;
            } else {
                cp = c & (0x7F >> n);
                for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
            }
        }
        i += n;
        switch (cp) {
            case '"': o += "\\\""; continue;
            case '\\': o += "\\\\"; continue;
            case '\n': o += "\\n"; continue;
            case '\r': o += "\\r"; continue;
            case '\t': o += "\\t"; continue;
            case '\b': o += "\\b"; continue;
            case '\f': o += "\\f"; continue;
            default: break;
        }
        if (cp < 0x20 || (cp >= 0x80 && cp < 0x10000)) {
            std::snprintf(buf, sizeof buf, "\\u%04x", cp);
            o += buf;
        } else if (cp >= 0x10000) {
            const uint32_t v = cp - 0x10000;
            std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
            o += buf;
        } else {
            o += static_cast<char>(cp);
        }
    }
    return o + "\"";
}

Json Json::integer(int64_t v) {
    Json j;
    j.kind = NUM;
    j.num = std::to_string(v);
    return j;
}
Json Json::uinteger(uint64_t v) {
    Json j;
    j.kind = NUM;
    j.num = std::to_string(v);
    return j;
}
Json Json::real(double v) {
    Json j;
    j.kind = NUM;
    j.num = py_float(v);
    return j;
}
Json Json::str(const std::string& v) {
    Json j;
    j.kind = STR;
    j.s = v;
    return j;
}
Json Json::array() {
    Json j;
    j.kind = ARR;
    return j;
}
Json Json::object() {
    Json j;
    j.kind = OBJ;
    return j;
}

std::string Json::dump() const {
    switch (kind) {
        case NUL: return "null";
        case BOOL: return b ? "true" : "false";
        case NUM: return num;
        case STR: return json_string(s);
        case ARR: {
            std::string o = "[";
            for (size_t i = 0; i < arr.size(); ++i) o += (i ? "," : "") + arr[i].dump();
            return o + "]";
        }
        case OBJ: {
            // Python sorts str keys by code point; std::map sorts bytes: the same for UTF-8
            std::string o = "{";
            bool first = true;
            for (const auto& kv : obj) {
                o += (first ? "" : ",") + json_string(kv.first) + ":" + kv.second.dump();
                first = false;
            }
            return o + "}";
        }
    }
    return "null";
}

double Json::as_double() const {
    if (kind != NUM) return std::nan("");
    if (num == "NaN") return std::nan("");
    if (num == "Infinity") return INFINITY;
    if (num == "-Infinity") return -INFINITY;
    return std::strtod(num.c_str(), nullptr);
}

const Json* Json::get(const std::string& k) const {
    if (kind != OBJ) return nullptr;
    auto it = obj.find(k);
    return it == obj.end() ? nullptr : &it->second;
}

namespace {
struct Parser {
    const std::string& t;
    size_t i = 0;
    int depth = 0;
    void ws() {
        while (i < t.size() && (t[i] == ' ' || t[i] == '\n' || t[i] == '\r' || t[i] == '\t')) ++i;
    }
    bool lit(const char* s) {
        const size_t n = std::strlen(s);
        if (t.compare(i, n, s) != 0) return false;
        i += n;
        return true;
    }
    bool str(std::string& out) {
        if (i >= t.size() || t[i] != '"') return false;
        ++i;
        while (i < t.size() && t[i] != '"') {
            char c = t[i++];
            if (static_cast<unsigned char>(c) < 0x20) return false;
            if (c != '\\') {
                out += c;
                continue;
            }
            if (i >= t.size()) return false;
            c = t[i++];
            switch (c) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'u': {
                    if (i + 4 > t.size()) return false;
                    uint32_t cp = static_cast<uint32_t>(std::strtoul(t.substr(i, 4).c_str(), nullptr, 16));
                    i += 4;
                    if (cp >= 0xD800 && cp < 0xDC00 && i + 6 <= t.size() && t[i] == '\\' && t[i + 1] == 'u') {
                        const uint32_t lo = static_cast<uint32_t>(std::strtoul(t.substr(i + 2, 4).c_str(), nullptr, 16));
                        i += 6;
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    }
                    if (cp < 0x80) out += static_cast<char>(cp);
                    else if (cp < 0x800) {
                        out += static_cast<char>(0xC0 | (cp >> 6));
                        out += static_cast<char>(0x80 | (cp & 0x3F));
                    } else if (cp < 0x10000) {
                        out += static_cast<char>(0xE0 | (cp >> 12));
                        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                        out += static_cast<char>(0x80 | (cp & 0x3F));
                    } else {
                        out += static_cast<char>(0xF0 | (cp >> 18));
                        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
                        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                        out += static_cast<char>(0x80 | (cp & 0x3F));
                    }
                    break;
                }
                default: return false;
            }
        }
        if (i >= t.size()) return false;
        ++i;
        return true;
    }
    bool value(Json& v, std::vector<std::pair<std::string, std::string>>* members) {
        if (++depth > 64) return false;
        ws();
        if (i >= t.size()) return false;
        const char c = t[i];
        bool ok = true;
        if (c == '{') {
            v.kind = Json::OBJ;
            ++i;
            ws();
            if (i < t.size() && t[i] == '}') {
                ++i;
            } else {
                while (true) {
                    ws();
                    const size_t start = i;
                    std::string k;
                    if (!str(k)) return false;
                    ws();
                    if (i >= t.size() || t[i] != ':') return false;
                    ++i;
                    Json item;
                    if (!value(item, nullptr)) return false;
                    if (members) members->emplace_back(k, t.substr(start, i - start));
                    v.obj[k] = std::move(item);
                    ws();
                    if (i < t.size() && t[i] == ',') {
                        ++i;
                        continue;
                    }
                    if (i < t.size() && t[i] == '}') {
                        ++i;
                        break;
                    }
                    return false;
                }
            }
        } else if (c == '[') {
            v.kind = Json::ARR;
            ++i;
            ws();
            if (i < t.size() && t[i] == ']') {
                ++i;
            } else {
                while (true) {
                    Json item;
                    if (!value(item, nullptr)) return false;
                    v.arr.push_back(std::move(item));
                    ws();
                    if (i < t.size() && t[i] == ',') {
                        ++i;
                        continue;
                    }
                    if (i < t.size() && t[i] == ']') {
                        ++i;
                        break;
                    }
                    return false;
                }
            }
        } else if (c == '"') {
            v.kind = Json::STR;
            ok = str(v.s);
        } else if (lit("true")) {
            v.kind = Json::BOOL;
            v.b = true;
        } else if (lit("false")) {
            v.kind = Json::BOOL;
        } else if (lit("null")) {
            v.kind = Json::NUL;
        } else if (lit("NaN")) {
            v.kind = Json::NUM;
            v.num = "NaN";
        } else if (lit("Infinity")) {
            v.kind = Json::NUM;
            v.num = "Infinity";
        } else if (lit("-Infinity")) {
            v.kind = Json::NUM;
            v.num = "-Infinity";
        } else {
            const size_t s = i;
            while (i < t.size() && (std::strchr("+-.eE", t[i]) || (t[i] >= '0' && t[i] <= '9'))) ++i;
            if (i == s) return false;
            v.kind = Json::NUM;
            v.num = t.substr(s, i - s);
        }
        --depth;
        return ok;
    }
};
}  // namespace

bool json_parse(const std::string& text, Json& out, std::vector<std::pair<std::string, std::string>>* members) {
    Parser p{text};
    if (!p.value(out, members)) return false;
    p.ws();
    return p.i == text.size();
}

std::string encode_record(const Json& rec) {
    Json body = rec;
    body.obj.erase("crc");
    const std::string b = body.dump();
    Json out = body;
    out.obj["crc"] = Json::uinteger(crc32(b.data(), b.size()));
    return out.dump() + "\n";
}

bool decode_line(const std::string& line, Json& rec) {
    if (line.empty() || line.back() != '\n') return false;
    std::vector<std::pair<std::string, std::string>> members;
    Json v;
    if (!json_parse(line.substr(0, line.size() - 1), v, &members) || v.kind != Json::OBJ) return false;
    const Json* crc = v.get("crc");
    if (!crc || crc->kind != Json::NUM) return false;
    // the canonical text without the crc member: the line is canonical, so its other members'
    // raw text is exactly what Python's json.dumps wrote for them
    std::string body = "{";
    bool first = true;
    for (const auto& m : members) {
        if (m.first == "crc") continue;
        body += (first ? "" : ",") + m.second;
        first = false;
    }
    body += "}";
    if (std::to_string(crc32(body.data(), body.size())) != crc->num) return false;
    v.obj.erase("crc");
    rec = std::move(v);
    return true;
}

LogContents read_log(const std::string& path) {
    LogContents c;
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) return c;
    c.exists = true;
    std::string data;
    char buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) data.append(buf, n);
    std::fclose(f);
    size_t pos = 0;
    while (pos < data.size()) {
        const size_t nl = data.find('\n', pos);
        const std::string line = nl == std::string::npos ? data.substr(pos) : data.substr(pos, nl + 1 - pos);
        Json rec;
        if (!decode_line(line, rec)) break;
        const Json* type = rec.get("type");
        if (type && type->kind == Json::STR && type->s == "header") {
            if (c.has_header || !c.records.empty()) throw Error(ET_ERR_FORMAT, path + ": seed log has a second header");
            c.header = rec;
            c.has_header = true;
        } else {
            c.records.push_back(rec);
        }
        pos += line.size();
        c.valid = pos;
    }
    if (!c.records.empty() && !c.has_header) throw Error(ET_ERR_FORMAT, path + ": seed log has no header");
    return c;
}

SeedLogWriter::SeedLogWriter(const std::string& path, uint64_t valid, const Json* header, int fsync_every)
    : path_(path), fsync_every_(fsync_every > 0 ? fsync_every : 10) {
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) throw Error(ET_ERR_IO, path + ": cannot open the seed log for writing (" + std::strerror(errno) + ")");
    // drop a torn/corrupt tail so appends follow the valid records
    if (::ftruncate(fd_, static_cast<off_t>(valid)) != 0 || ::lseek(fd_, static_cast<off_t>(valid), SEEK_SET) < 0) {
        const std::string e = std::strerror(errno);
        ::close(fd_);
        fd_ = -1;
        throw Error(ET_ERR_IO, path + ": cannot truncate the seed log (" + e + ")");
    }
    if (header) write(encode_record(*header), true);
}

SeedLogWriter::~SeedLogWriter() {
    if (fd_ >= 0) {
        ::fsync(fd_);
        ::close(fd_);
    }
}

void SeedLogWriter::write(const std::string& data, bool force_sync) {
    size_t off = 0;
    while (off < data.size()) {  // straight to the OS: a killed process loses at most this record
        const ssize_t w = ::write(fd_, data.data() + off, data.size() - off);
        if (w < 0) {
            if (errno == EINTR) continue;
            throw Error(ET_ERR_IO, path_ + ": cannot write the seed log (" + std::strerror(errno) + ")");
        }
        off += static_cast<size_t>(w);
    }
    if (force_sync || ++pending_ >= fsync_every_) {
        ::fsync(fd_);
        pending_ = 0;
    }
}

void SeedLogWriter::append(const Json& rec) { write(encode_record(rec), false); }

void SeedLogWriter::sync() {
    ::fsync(fd_);
    pending_ = 0;
}

namespace {
void put16(std::string& s, uint16_t v) {
    s += static_cast<char>(v & 0xFF);
    s += static_cast<char>(v >> 8);
}
void put32(std::string& s, uint32_t v) {
    for (int i = 0; i < 4; ++i) s += static_cast<char>((v >> (8 * i)) & 0xFF);
}

std::string npy(const NpyArray& a) {
    std::string shape = "(";
    for (size_t i = 0; i < a.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(a.shape[i]);
    shape += a.shape.size() == 1 ? ",)" : ")";
    std::string hdr = std::string("{'descr': '") + (a.f32 ? "<f4" : "<i8") + "', 'fortran_order': False, 'shape': " + shape + ", }";
    while ((10 + hdr.size() + 1) % 64) hdr += ' ';
    hdr += '\n';
    std::string o = "\x93NUMPY";
    o += '\x01';
    o += '\x00';
    put16(o, static_cast<uint16_t>(hdr.size()));
    o += hdr;
    if (a.f32) {
        int64_t n = 1;
        for (int64_t d : a.shape) n *= d;
        o.append(reinterpret_cast<const char*>(a.f32), static_cast<size_t>(n) * 4);
    } else {
        o.append(reinterpret_cast<const char*>(&a.i64), 8);
    }
    return o;
}
}  // namespace

void write_npz(const std::string& path, const std::vector<NpyArray>& arrays) {
    std::string zip, central;
    uint16_t count = 0;
    for (const NpyArray& a : arrays) {
        const std::string data = npy(a);
        const std::string name = a.name + ".npy";
        const uint32_t crc = crc32(data.data(), data.size());
        const uint32_t off = static_cast<uint32_t>(zip.size());
        put32(zip, 0x04034b50);
        put16(zip, 20);
        put16(zip, 0);
        put16(zip, 0);                 // stored
        put16(zip, 0);
        put16(zip, 0x21);              // 1980-01-01
        put32(zip, crc);
        put32(zip, static_cast<uint32_t>(data.size()));
        put32(zip, static_cast<uint32_t>(data.size()));
        put16(zip, static_cast<uint16_t>(name.size()));
        put16(zip, 0);
        zip += name;
        zip += data;
        put32(central, 0x02014b50);
        put16(central, 20);
        put16(central, 20);
        put16(central, 0);
        put16(central, 0);
        put16(central, 0);
        put16(central, 0x21);
        put32(central, crc);
        put32(central, static_cast<uint32_t>(data.size()));
        put32(central, static_cast<uint32_t>(data.size()));
        put16(central, static_cast<uint16_t>(name.size()));
        put16(central, 0);
        put16(central, 0);
        put16(central, 0);
        put16(central, 0);
        put32(central, 0);
        put32(central, off);
        central += name;
        ++count;
    }
    const uint32_t cd_off = static_cast<uint32_t>(zip.size());
    zip += central;
    put32(zip, 0x06054b50);
    put16(zip, 0);
    put16(zip, 0);
    put16(zip, count);
    put16(zip, count);
    put32(zip, static_cast<uint32_t>(central.size()));
    put32(zip, cd_off);
    put16(zip, 0);
    const std::string tmp = path + ".tmp";
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throw Error(ET_ERR_IO, tmp + ": cannot write the state (" + std::strerror(errno) + ")");
    size_t off = 0;
    while (off < zip.size()) {
        const ssize_t w = ::write(fd, zip.data() + off, zip.size() - off);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) {
            const std::string e = std::strerror(errno);
            ::close(fd);
            throw Error(ET_ERR_IO, tmp + ": cannot write the state (" + e + ")");
        }
        off += static_cast<size_t>(w);
    }
    ::fsync(fd);
    ::close(fd);
    if (std::rename(tmp.c_str(), path.c_str()) != 0)
        throw Error(ET_ERR_IO, path + ": cannot rename the state into place (" + std::strerror(errno) + ")");
    std::string dir = path.substr(0, path.find_last_of('/') == std::string::npos ? 0 : path.find_last_of('/'));
    if (dir.empty()) dir = ".";
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_CLOEXEC);
    if (dfd >= 0) {
        ::fsync(dfd);
        ::close(dfd);
    }
}

}  // namespace capi
}  // namespace edgetune
