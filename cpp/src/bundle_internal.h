// Internal to moedge_rt's bundle loader (manifest.cc, files.cc, paths.cc, json_text.cc, onnx_external.cc,
// plan.cc, npy.cc): shared limits, message helpers, path checks and the typed manifest reader. Not installed.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moedge/runtime.h"

namespace moedge::detail {

using nlohmann::json;

constexpr int64_t kMaxDim = int64_t{1} << 16;    // heads, head size, experts per layer
constexpr int64_t kMaxVocab = int64_t{1} << 31;  // vocabulary size and context are below this
constexpr int64_t kMaxLayers = int64_t{1} << 16;  // the largest span a layer's stage may have
constexpr size_t kShownChars = 40;               // a value shown in a message, at most
constexpr const char* kResplit = "re-split the bundle with moedge split";
constexpr const char* kWritePlan = "write the plan for this bundle with `moedge profile --plan`";

// A file descriptor, closed when it goes out of scope.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// ---- json_text.cc: values in one-line messages, JSON parsing with a position in its error

// `text` with control characters escaped (\n, \x1b): safe inside a one-line message.
std::string printable(std::string_view text);
// At most `limit` UTF-8 characters of `text`; longer text ends in "..." within the limit.
std::string clip(const std::string& text, size_t limit);
// A string as Python's repr() writes it ('a/b', "it's", '\n' escaped).
std::string repr(std::string_view text);
// A string as JSON (Python's json.dumps: quoted, non-ASCII as \uXXXX).
std::string json_string(const std::string& text);
// A string shown in a message: as Python's repr, at most kShownChars characters.
std::string show_text(const std::string& text);
// A manifest value shown in a message: a string as Python's repr, anything else as compact JSON;
// at most kShownChars characters.
std::string show(const json& value);
// `text` parsed as JSON, or one Error naming `what` and where the text stops being JSON.
json parse_json(const std::string& text, const std::string& what);

// ---- paths.cc: where the paths a manifest names may lead

// A normalised relative path: not empty or absolute, no empty, "." or ".." parts, no backslash or NUL.
bool normalised_relative(const std::string& path);
// realpath(3) of `path`, or "" when it cannot be resolved (errno says why).
std::string real_path(const std::string& path);
// Where `rel` leads from the resolved folder `root` with every symlink resolved, as far as the path
// exists (as Python's os.path.realpath, not strict): a part that does not exist is taken as written,
// ".." in a link's target climbs lexically, and a link loop leaves the rest unresolved.
std::string resolve_inside(const std::string& root, const std::string& rel);
// True when `target` is `root` or lies below it (both resolved).
bool lies_inside(const std::string& root, const std::string& target);
// posixpath.normpath of a relative path: "." and empty parts dropped, ".." climbs (kept at the start).
std::string normalise(const std::string& path);
// The bundle folder as messages name it: "." for "", without trailing slashes.
std::string bundle_folder(const std::string& bundle_dir);

// ---- files.cc: bounded reads

// The contents of a regular file of at most kMaxJsonBytes; stat before open, so a FIFO or a device is
// refused without being opened. `what` names the file in messages ("plan file x.json").
std::string read_small_file(const std::string& path, const std::string& what, const std::string& fix);

// ---- npy.cc: an ort-cpu bundle's rotary tables

struct RotaryTables {
  int64_t positions = 0;
  int64_t half = 0;              // head_dim / 2
  std::vector<float> cos, sin;  // positions x half each
};
// The cos/sin tables of <bundle_dir>/<rel>: a float32 (2, positions, head_dim / 2) C-order .npy whose
// size is its header's plus the tables'; anything else is one Error naming the file.
RotaryTables read_rotary(const std::string& bundle_dir, const std::string& rel, int head_dim);
// The same checks on a whole file's bytes, reading nothing (the fuzz target uses it).
void check_rotary_npy(std::string_view bytes, const std::string& rel, int head_dim);

// ---- manifest.cc: the manifest's graphs and file names in messages

// Every graph with its manifest field path ("layers[3].moe.experts[5]"), in run order.
std::vector<std::pair<std::string, const GraphSpec*>> named_graphs(const Manifest& m);
// The manifest field of a files key: files["stages/x.onnx"].
std::string files_field(const std::string& rel);
// A listed file's path in a message about the file: as written, on one line, not overlong.
std::string file_name(const std::string& rel);

// Typed access to parsed JSON (a manifest, a plan): every failure names the field and what it must be.
class Reader {
 public:
  explicit Reader(std::string where) : where_(std::move(where)) {}

  [[noreturn]] void fail_shown(const std::string& field, const std::string& description, const std::string& shown) const {
    throw Error(where_ + ": " + field + " must be " + description + ", got " + shown);
  }
  [[noreturn]] void fail(const std::string& field, const std::string& description, const json& value) const {
    fail_shown(field, description, show(value));
  }
  [[noreturn]] void not_inside(const std::string& field, const std::string& shown) const {
    throw Error(where_ + ": " + field + " " + shown + " is not a relative path inside the bundle: " + kResplit);
  }

  const json& get(const json& obj, const char* key, const std::string& field) const {
    const auto it = obj.find(key);
    if (it == obj.end()) throw Error(where_ + ": " + field + " is missing");
    return *it;
  }
  // The value of `key` in `obj`, or nullptr when it is absent or null (an optional field).
  static const json* optional(const json& obj, const char* key) {
    const auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  const json& object(const json& value, const std::string& field) const {
    if (!value.is_object()) fail(field, "an object", value);
    return value;
  }
  const json& array(const json& value, const std::string& field, bool nonempty = false) const {
    if (!value.is_array() || (nonempty && value.empty()))
      fail(field, nonempty ? "a non-empty array" : "an array", value);
    return value;
  }
  std::string string(const json& value, const std::string& field) const {
    if (!value.is_string() || value.get_ref<const std::string&>().empty()) fail(field, "a non-empty string", value);
    return value.get<std::string>();
  }
  bool boolean(const json& value, const std::string& field) const {
    if (!value.is_boolean()) fail(field, "a boolean", value);
    return value.get<bool>();
  }
  int64_t integer(const json& value, const std::string& field, int64_t lo, int64_t hi) const {
    if (value.is_number_unsigned()) {
      const auto u = value.get<uint64_t>();
      if (hi >= 0 && u <= static_cast<uint64_t>(hi) && static_cast<int64_t>(u) >= lo) return static_cast<int64_t>(u);
    } else if (value.is_number_integer()) {
      const auto i = value.get<int64_t>();
      if (lo <= i && i <= hi) return i;
    }
    fail(field, "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]", value);
  }
  // The integer `key` of `obj`, which must be there.
  int64_t integer_at(const json& obj, const char* key, const std::string& field, int64_t lo, int64_t hi) const {
    return integer(get(obj, key, field), field, lo, hi);
  }
  void optional_integer(const json& obj, const char* key, const std::string& field, int64_t lo, int64_t hi) const {
    if (const json* value = optional(obj, key)) integer(*value, field, lo, hi);
  }
  // A path the manifest names: normalised and relative (where it resolves to is checked later).
  std::string path(const json& value, const std::string& field) const {
    if (!value.is_string() || !normalised_relative(value.get_ref<const std::string&>())) not_inside(field, show(value));
    return value.get<std::string>();
  }

 private:
  std::string where_;
};

}  // namespace moedge::detail
