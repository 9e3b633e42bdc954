// An ort-cpu bundle's rotary tables: a .npy file (float32 little-endian, C order, (2, positions,
// head_dim / 2): cos then sin) read without numpy. The header (format 1.0, 2.0 or 3.0, a Python dict
// literal with descr, fortran_order and shape, at most 10000 bytes as numpy allows) is parsed here, and
// the file's size must be the header's plus the tables' before anything the header sizes is allocated.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bundle_internal.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the tables are read as little-endian float32");

namespace moedge::detail {
namespace {

constexpr size_t kMaxNpyHeader = 10000;  // numpy's max_header_size: np.load refuses longer headers
constexpr const char* kResplitRotary = "re-split the bundle with moedge split --target ort-cpu";

// The header dict of a .npy file, parsed.
struct NpyHeader {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
  size_t data_offset = 0;  // where the array's bytes start
};

[[noreturn]] void unreadable(const std::string& rel, const std::string& why) {
  throw Error("bundle file " + file_name(rel) + " is not a readable .npy cos/sin table (" + why + "): " +
              kResplitRotary);
}

// A cursor over the header dict text (a Python literal: strings, True/False, a tuple of integers).
class DictReader {
 public:
  DictReader(std::string_view text, const std::string& rel) : text_(text), rel_(rel) {}

  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\n' || text_[pos_] == '\t')) ++pos_;
  }
  bool at_end() const { return pos_ >= text_.size(); }
  bool take(char c) {
    skip_space();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!take(c)) bad();
  }
  // A quoted string without escapes.
  std::string string() {
    skip_space();
    if (at_end() || (text_[pos_] != '\'' && text_[pos_] != '"')) bad();
    const char quote = text_[pos_++];
    const size_t end = text_.find(quote, pos_);
    if (end == std::string_view::npos || end - pos_ > 64) bad();
    const std::string_view out = text_.substr(pos_, end - pos_);
    if (out.find('\\') != std::string_view::npos) bad();
    pos_ = end + 1;
    return std::string(out);
  }
  bool boolean() {
    skip_space();
    for (const bool value : {true, false}) {
      const std::string_view word = value ? "True" : "False";
      if (text_.substr(pos_, word.size()) == word) {
        pos_ += word.size();
        return value;
      }
    }
    bad();
  }
  // A tuple of non-negative integers: (), (n,), (a, b), (a, b,).
  std::vector<int64_t> tuple() {
    expect('(');
    std::vector<int64_t> out;
    bool comma = false;
    while (!take(')')) {
      skip_space();
      size_t digits = 0;
      int64_t value = 0;
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
        if (++digits > 18) bad();  // below 10^18: no overflow
        value = value * 10 + (text_[pos_++] - '0');
      }
      if (digits == 0) bad();
      out.push_back(value);
      comma = take(',');
      if (!comma) {
        expect(')');
        break;
      }
    }
    if (out.size() == 1 && !comma) bad();  // (n) is an integer, not a tuple
    return out;
  }
  [[noreturn]] void bad() const { unreadable(rel_, "its header is not a numpy array header"); }

 private:
  std::string_view text_;
  const std::string& rel_;
  size_t pos_ = 0;
};

uint32_t little_endian(const unsigned char* p, int bytes) {
  uint32_t out = 0;
  for (int i = bytes - 1; i >= 0; --i) out = out << 8 | p[i];
  return out;
}

// The header at the start of `bytes` (which may hold more of the file, or only the header).
NpyHeader parse_npy_header(std::string_view bytes, const std::string& rel) {
  const auto* raw = reinterpret_cast<const unsigned char*>(bytes.data());
  if (bytes.size() < 10 || bytes.substr(0, 6) != std::string_view("\x93NUMPY", 6)) unreadable(rel, "no .npy magic");
  const int major = raw[6], minor = raw[7];
  if (!((major == 1 || major == 2 || major == 3) && minor == 0))
    unreadable(rel, ".npy format version " + std::to_string(major) + "." + std::to_string(minor));
  const int width = major == 1 ? 2 : 4;
  if (bytes.size() < static_cast<size_t>(8 + width)) unreadable(rel, "its header is cut short");
  const size_t length = little_endian(raw + 8, width);
  if (length > kMaxNpyHeader) unreadable(rel, "its header is longer than 10000 bytes");
  const size_t start = 8 + static_cast<size_t>(width);
  if (bytes.size() < start + length) unreadable(rel, "its header is cut short");
  const std::string_view text = bytes.substr(start, length);
  for (const char c : text)
    if (static_cast<unsigned char>(c) >= 0x7f || (static_cast<unsigned char>(c) < 0x20 && c != '\n' && c != '\t'))
      unreadable(rel, "its header is not a numpy array header");
  NpyHeader header;
  header.data_offset = start + length;
  DictReader d(text, rel);
  d.expect('{');
  bool seen_descr = false, seen_order = false, seen_shape = false;
  while (!d.take('}')) {
    const std::string key = d.string();
    d.expect(':');
    if (key == "descr" && !seen_descr) {
      header.descr = d.string();
      seen_descr = true;
    } else if (key == "fortran_order" && !seen_order) {
      header.fortran_order = d.boolean();
      seen_order = true;
    } else if (key == "shape" && !seen_shape) {
      header.shape = d.tuple();
      seen_shape = true;
    } else {
      d.bad();
    }
    if (!d.take(',')) {
      d.expect('}');
      break;
    }
  }
  d.skip_space();
  if (!d.at_end() || !seen_descr || !seen_order || !seen_shape) d.bad();
  return header;
}

// A descr as numpy names the dtype in messages (float32), else as written ('>f4').
std::string dtype_name(const std::string& descr) {
  static const std::pair<const char*, const char*> names[] = {
      {"f2", "float16"}, {"f4", "float32"}, {"f8", "float64"}, {"i1", "int8"},  {"i2", "int16"}, {"i4", "int32"},
      {"i8", "int64"},   {"u1", "uint8"},   {"u2", "uint16"},  {"u4", "uint32"}, {"u8", "uint64"}, {"b1", "bool"}};
  if (descr.size() == 3 && (descr[0] == '<' || descr[0] == '|'))
    for (const auto& [code, name] : names)
      if (descr.compare(1, 2, code) == 0) return name;
  return show_text(descr);
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

// The table size a checked header gives: (positions, half); an Error unless it holds the rotary tables
// of a head_dim-wide attention in a file of `file_bytes` bytes.
std::pair<int64_t, int64_t> rotary_layout(const NpyHeader& h, const std::string& rel, int head_dim,
                                          int64_t file_bytes) {
  const std::string file = "bundle file " + file_name(rel);
  const bool float32 = h.descr == "<f4";
  const bool layout = h.shape.size() == 3 && h.shape[0] == 2 && h.shape[1] >= 1 && h.shape[1] < kMaxVocab;
  const bool half = layout && head_dim % 2 == 0 && h.shape[2] == head_dim / 2;
  if (!float32 || !layout || !half || h.fortran_order)
    throw Error(file + " must hold float32 (2, positions, head_dim / 2) cos/sin tables, got " + dtype_name(h.descr) +
                " " + shape_text(h.shape) + (h.fortran_order ? " in Fortran order" : "") +
                (float32 && layout && !half ? " with head_dim " + std::to_string(head_dim) : "") + ": " + kResplitRotary);
  const int64_t data = 2 * h.shape[1] * h.shape[2] * int64_t{4};  // below 2^31 x 2^15 x 8
  if (file_bytes - static_cast<int64_t>(h.data_offset) != data)
    throw Error(file + " has " + std::to_string(file_bytes) + " bytes, its .npy header says " +
                std::to_string(static_cast<int64_t>(h.data_offset) + data) + ": " + kResplitRotary);
  return {h.shape[1], h.shape[2]};
}

}  // namespace

void check_rotary_npy(std::string_view bytes, const std::string& rel, int head_dim) {
  rotary_layout(parse_npy_header(bytes, rel), rel, head_dim, static_cast<int64_t>(bytes.size()));
}

RotaryTables read_rotary(const std::string& bundle_dir, const std::string& rel, int head_dim) {
  const std::string path = bundle_folder(bundle_dir) + "/" + rel;
  Fd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  struct stat info {};
  if (fd.get() < 0 || ::fstat(fd.get(), &info) != 0)
    throw Error("cannot read " + clip(printable(path), 300) + " (" + std::strerror(errno) + ")");
  if (!S_ISREG(info.st_mode))
    throw Error("bundle file " + file_name(rel) + " is not a regular file: re-copy the bundle");
  // Read exactly `size` bytes at `offset` into `out`.
  auto read_at = [&](void* out, size_t size, off_t offset) {
    auto* dst = static_cast<char*>(out);
    while (size > 0) {
      const ssize_t got = ::pread(fd.get(), dst, size, offset);
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) throw Error("cannot read " + clip(printable(path), 300) + " (" + std::strerror(errno) + ")");
      if (got == 0) unreadable(rel, "the file ends early");
      dst += got;
      size -= static_cast<size_t>(got);
      offset += got;
    }
  };
  const auto file_bytes = static_cast<int64_t>(info.st_size);
  std::string head(static_cast<size_t>(std::min<int64_t>(file_bytes, 12 + kMaxNpyHeader)), '\0');
  read_at(head.data(), head.size(), 0);
  const NpyHeader header = parse_npy_header(head, rel);
  const auto [positions, half] = rotary_layout(header, rel, head_dim, file_bytes);
  RotaryTables tables;
  tables.positions = positions;
  tables.half = half;
  const auto count = static_cast<size_t>(positions * half);
  tables.cos.resize(count);
  tables.sin.resize(count);
  const auto offset = static_cast<off_t>(header.data_offset);
  read_at(tables.cos.data(), count * sizeof(float), offset);
  read_at(tables.sin.data(), count * sizeof(float), offset + static_cast<off_t>(count * sizeof(float)));
  return tables;
}

}  // namespace moedge::detail
