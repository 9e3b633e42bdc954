// The bundle format on disk: manifest.json (parsed with nlohmann/json, checked field by field), where
// its paths may point, the files' sizes and hashes (OpenSSL), placement plans. A bundle comes from
// someone else: every value is checked before use, every path before any file is opened, and every
// failure is one Error naming the file or the manifest field (mirrors moedge.manifest in Python).
#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include "moedge/runtime.h"

namespace moedge {
namespace {

using nlohmann::json;

constexpr int64_t kMaxDim = int64_t{1} << 16;    // heads, head size, experts per layer
constexpr int64_t kMaxVocab = int64_t{1} << 31;  // vocabulary size and context are below this
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

void append_hex_escape(std::string& out, unsigned char c) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "\\x%02x", c);
  out += buf;
}

// `text` with control characters escaped (\n, \x1b): safe inside a one-line message.
std::string printable(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      append_hex_escape(out, c);
    } else {
      out += ch;
    }
  }
  return out;
}

// At most `limit` UTF-8 characters of `text`; longer text ends in "..." within the limit.
std::string clip(const std::string& text, size_t limit) {
  size_t chars = 0;
  for (const char ch : text) chars += (static_cast<unsigned char>(ch) & 0xC0) != 0x80;
  if (chars <= limit) return text;
  size_t keep = 0, seen = 0;
  for (; keep < text.size(); ++keep) {
    if ((static_cast<unsigned char>(text[keep]) & 0xC0) != 0x80 && seen++ == limit - 3) break;
  }
  return text.substr(0, keep) + "...";
}

// A string as Python's repr() writes it ('a/b', "it's", '\n' escaped).
std::string repr(std::string_view text) {
  const bool single = text.find('\'') != std::string_view::npos;
  const bool dbl = text.find('"') != std::string_view::npos;
  const char quote = single && !dbl ? '"' : '\'';
  std::string out(1, quote);
  for (size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c == static_cast<unsigned char>(quote) || c == '\\') {
      out += '\\';
      out += text[i];
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      append_hex_escape(out, c);
    } else if (c == 0xC2 && i + 1 < text.size() && static_cast<unsigned char>(text[i + 1]) < 0xA0) {
      append_hex_escape(out, static_cast<unsigned char>(text[++i]));  // U+0080..U+009F, as repr does
    } else {
      out += text[i];
    }
  }
  return out + quote;
}

// A string as JSON (Python's json.dumps: quoted, non-ASCII as \uXXXX).
std::string json_string(const std::string& text) {
  return json(text).dump(-1, ' ', true, json::error_handler_t::replace);
}

// Compact JSON of `value` as Python's json.dumps writes it; stops soon after `limit` characters, so a
// huge or deeply nested value costs little (each nesting level writes a bracket first).
void render(const json& value, std::string& out, size_t limit) {
  if (out.size() > limit) return;
  if (value.is_array()) {
    out += '[';
    bool first = true;
    for (const auto& item : value) {
      if (out.size() > limit) return;
      if (!first) out += ", ";
      first = false;
      render(item, out, limit);
    }
    out += ']';
  } else if (value.is_object()) {
    out += '{';
    bool first = true;
    for (auto it = value.begin(); it != value.end(); ++it) {
      if (out.size() > limit) return;
      if (!first) out += ", ";
      first = false;
      out += json_string(it.key().substr(0, limit));
      out += ": ";
      render(it.value(), out, limit);
    }
    out += '}';
  } else if (value.is_string()) {
    out += json_string(value.get_ref<const std::string&>().substr(0, limit));
  } else {
    out += value.dump();  // null, a boolean or a number
  }
}

// A string shown in a message: as Python's repr, at most kShownChars characters.
std::string show_text(const std::string& text) {
  return clip(repr(std::string_view(text).substr(0, 4 * kShownChars)), kShownChars);
}

// A manifest value shown in a message: a string as Python's repr, anything else as compact JSON;
// at most kShownChars characters.
std::string show(const json& value) {
  if (value.is_string()) return show_text(value.get_ref<const std::string&>());
  std::string out;
  render(value, out, 4 * kShownChars);
  return clip(out, kShownChars);
}


// "line L, column C" of a byte offset in `text` (columns count characters, from 1).
std::string line_and_column(const std::string& text, size_t offset) {
  offset = std::min(offset, text.size());
  size_t line = 1, column = 1;
  for (size_t i = 0; i < offset; ++i) {
    if (text[i] == '\n') {
      ++line;
      column = 1;
    } else if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80) {
      ++column;
    }
  }
  return "line " + std::to_string(line) + ", column " + std::to_string(column);
}

// Deepest nesting of arrays and objects in JSON text (brackets inside strings do not count).
size_t nesting(const std::string& text) {
  size_t depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

constexpr size_t kMaxNesting = 500;  // a manifest nests about 6 deep; Python's json stops near 1000

// `text` parsed as JSON, or one Error naming `what` and where the text stops being JSON.
json parse_json(const std::string& text, const std::string& what) {
  if (nesting(text) > kMaxNesting) throw Error(what + " is not valid JSON (nested too deeply)");
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    throw Error(what + " is not valid JSON (" + line_and_column(text, e.byte > 0 ? e.byte - 1 : 0) + ")");
  } catch (const json::exception&) {
    throw Error(what + " is not valid JSON (a number out of range)");
  }
}

// The contents of a regular file of at most kMaxJsonBytes; stat before open, so a FIFO or a device is
// refused without being opened. `what` names the file in messages ("plan file x.json").
std::string read_small_file(const std::string& path, const std::string& what, const std::string& fix) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0)
    throw Error("cannot read " + what + " (" + std::strerror(errno) + "): " + fix);
  if (!S_ISREG(info.st_mode)) throw Error(what + " is not a regular file: " + fix);
  if (info.st_size > kMaxJsonBytes) throw Error(what + " is larger than 64 MiB: " + fix);
  Fd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  if (fd.get() < 0) throw Error("cannot read " + what + " (" + std::strerror(errno) + "): " + fix);
  if (::fstat(fd.get(), &info) != 0 || !S_ISREG(info.st_mode)) throw Error(what + " is not a regular file: " + fix);
  std::string text;
  char block[1 << 16];
  for (;;) {
    const ssize_t got = ::read(fd.get(), block, sizeof block);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw Error("cannot read " + what + " (" + std::strerror(errno) + "): " + fix);
    if (got == 0) break;
    text.append(block, static_cast<size_t>(got));
    if (static_cast<int64_t>(text.size()) > kMaxJsonBytes) throw Error(what + " is larger than 64 MiB: " + fix);
  }
  return text;
}

// A normalised relative path: not empty or absolute, no empty, "." or ".." parts, no backslash or NUL.
bool normalised_relative(const std::string& path) {
  if (path.empty() || path[0] == '/' || path.find('\\') != std::string::npos ||
      path.find('\0') != std::string::npos)
    return false;
  size_t start = 0;
  for (;;) {
    const size_t end = path.find('/', start);
    const std::string_view part(path.data() + start, (end == std::string::npos ? path.size() : end) - start);
    if (part.empty() || part == "." || part == "..") return false;
    if (end == std::string::npos) return true;
    start = end + 1;
  }
}

std::string real_path(const std::string& path) {
  std::unique_ptr<char, decltype(&std::free)> resolved(::realpath(path.c_str(), nullptr), &std::free);
  return resolved ? std::string(resolved.get()) : std::string();
}

// Where `rel` leads from the resolved folder `root` with every symlink resolved, as far as the path
// exists (as Python's os.path.realpath, not strict): a part that does not exist is taken as written,
// ".." in a link's target climbs lexically, and a link loop leaves the rest unresolved.
std::string resolve_inside(const std::string& root, const std::string& rel) {
  std::vector<std::string> pending;  // parts still to walk, the next one last
  const auto push_parts = [&pending](const std::string& path) {
    std::vector<std::string> parts;
    size_t start = 0;
    for (;;) {
      const size_t end = path.find('/', start);
      parts.push_back(path.substr(start, end == std::string::npos ? std::string::npos : end - start));
      if (end == std::string::npos) break;
      start = end + 1;
    }
    pending.insert(pending.end(), parts.rbegin(), parts.rend());
  };
  push_parts(rel);
  std::string path = root;
  int links = 0;
  while (!pending.empty()) {
    const std::string part = std::move(pending.back());
    pending.pop_back();
    if (part.empty() || part == ".") continue;
    if (part == "..") {
      path.resize(std::max<size_t>(path.rfind('/'), 1));  // "/a/b" -> "/a", "/a" -> "/"
      continue;
    }
    const std::string next = path == "/" ? "/" + part : path + "/" + part;
    struct stat info {};
    if (::lstat(next.c_str(), &info) != 0 || !S_ISLNK(info.st_mode)) {
      path = next;
      continue;
    }
    if (++links > 40) {  // a loop: the rest stays as written
      path = next;
      for (auto it = pending.rbegin(); it != pending.rend(); ++it) path += "/" + *it;
      return path;
    }
    std::string target(4096, '\0');
    const ssize_t size = ::readlink(next.c_str(), target.data(), target.size());
    if (size <= 0 || static_cast<size_t>(size) >= target.size()) {
      path = next;
      continue;
    }
    target.resize(static_cast<size_t>(size));
    if (target[0] == '/') path = "/";
    push_parts(target);
  }
  return path;
}

bool lies_inside(const std::string& root, const std::string& target) {
  if (root == "/" || target == root) return true;
  return target.size() > root.size() && target.compare(0, root.size(), root) == 0 && target[root.size()] == '/';
}

// Typed access to the parsed manifest: every failure names the field and what it must be.
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

bool is_sha256_hex(const json& value) {
  if (!value.is_string()) return false;
  const auto& text = value.get_ref<const std::string&>();
  if (text.size() != 64) return false;
  for (const char c : text)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

TensorSpec parse_tensor(const Reader& r, const json& d, const std::string& f) {
  r.object(d, f);
  const json& shape = r.array(r.get(d, "shape", f + ".shape"), f + ".shape");
  size_t i = 0;
  for (const auto& dim : shape) {
    if (!dim.is_number_integer() && !dim.is_string())
      r.fail(f + ".shape[" + std::to_string(i) + "]", "an integer or a name", dim);
    ++i;
  }
  TensorSpec t;
  t.name = r.string(r.get(d, "name", f + ".name"), f + ".name");
  t.dtype = r.string(r.get(d, "dtype", f + ".dtype"), f + ".dtype");
  return t;
}

GraphSpec parse_graph(const Reader& r, const json& d, const std::string& f) {
  r.object(d, f);
  const json& inputs = r.array(r.get(d, "inputs", f + ".inputs"), f + ".inputs");
  const json& outputs = r.array(r.get(d, "outputs", f + ".outputs"), f + ".outputs");
  GraphSpec g;
  g.file = r.path(r.get(d, "file", f + ".file"), f + ".file");
  for (size_t i = 0; i < inputs.size(); ++i)
    g.inputs.push_back(parse_tensor(r, inputs[i], f + ".inputs[" + std::to_string(i) + "]"));
  for (size_t i = 0; i < outputs.size(); ++i)
    g.outputs.push_back(parse_tensor(r, outputs[i], f + ".outputs[" + std::to_string(i) + "]"));
  g.bytes = r.integer_at(d, "bytes", f + ".bytes", 0, kMaxBytes);
  return g;
}

LayerSpec parse_layer(const Reader& r, const json& d, size_t i) {
  const std::string f = "layers[" + std::to_string(i) + "]";
  r.object(d, f);
  const json& index = r.get(d, "index", f + ".index");
  if (!index.is_number_unsigned() || index.get<uint64_t>() != i)
    r.fail(f + ".index", "layer index " + std::to_string(i), index);
  LayerSpec layer;
  layer.index = static_cast<int>(i);
  if (const json* moe = Reader::optional(d, "moe")) {
    const std::string fm = f + ".moe";
    r.object(*moe, fm);
    MoeSpec spec;
    spec.num_experts = static_cast<int>(r.integer_at(*moe, "num_experts", fm + ".num_experts", 1, kMaxDim));
    const json& experts = r.array(r.get(*moe, "experts", fm + ".experts"), fm + ".experts");
    if (experts.size() != static_cast<size_t>(spec.num_experts))
      r.fail_shown(fm + ".experts", "an array of num_experts=" + std::to_string(spec.num_experts) + " graphs",
                   show_text(std::to_string(experts.size()) + " graphs"));
    const std::string fg = fm + ".gating";
    const json& gating = r.object(r.get(*moe, "gating", fg), fg);
    const json& scoring = r.get(gating, "scoring", fg + ".scoring");
    if (!scoring.is_string() || scoring.get_ref<const std::string&>() != "softmax")
      r.fail(fg + ".scoring", "'softmax'", scoring);
    spec.gating.scoring = "softmax";
    spec.gating.top_k = static_cast<int>(r.integer_at(gating, "top_k", fg + ".top_k", 1, spec.num_experts));
    const std::string fn = fg + ".normalize_top_k";
    spec.gating.normalize_top_k = r.boolean(r.get(gating, "normalize_top_k", fn), fn);
    if (const auto it = gating.find("shared_expert"); it != gating.end())
      spec.gating.shared_expert = r.boolean(*it, fg + ".shared_expert");
    for (size_t j = 0; j < experts.size(); ++j)
      spec.experts.push_back(parse_graph(r, experts[j], fm + ".experts[" + std::to_string(j) + "]"));
    if (const json* router = Reader::optional(*moe, "router")) spec.router = r.path(*router, fm + ".router");
    layer.moe = std::move(spec);
  }
  layer.stage = parse_graph(r, r.get(d, "stage", f + ".stage"), f + ".stage");
  return layer;
}

// model: the fields a runtime reads, typed and in range.
void parse_model(const Reader& r, const json& model, Manifest& m) {
  r.object(model, "model");
  m.num_kv_heads = static_cast<int>(r.integer_at(model, "num_kv_heads", "model.num_kv_heads", 1, kMaxDim));
  m.head_dim = static_cast<int>(r.integer_at(model, "head_dim", "model.head_dim", 1, kMaxDim));
  r.optional_integer(model, "vocab_size", "model.vocab_size", 1, kMaxVocab - 1);
  r.optional_integer(model, "max_position_embeddings", "model.max_position_embeddings", 1, kMaxVocab - 1);
  r.optional_integer(model, "hidden_size", "model.hidden_size", 1, kMaxDim * 16);
  if (const json* vocab = Reader::optional(model, "vocab_size")) m.vocab_size = vocab->get<int64_t>();
  if (const json* context = Reader::optional(model, "max_position_embeddings")) m.context = context->get<int64_t>();
  const int64_t vocab = m.vocab_size > 0 ? m.vocab_size : kMaxVocab;
  for (const char* key : {"eos_token_id", "bos_token_id"}) {
    const json* value = Reader::optional(model, key);
    if (value == nullptr) continue;
    const std::string f = std::string("model.") + key;
    if (value->is_array()) {  // several end-of-sequence tokens
      for (size_t j = 0; j < value->size(); ++j)
        if (!(*value)[j].is_null()) r.integer((*value)[j], f + "[" + std::to_string(j) + "]", 0, vocab - 1);
    } else {
      const int64_t token = r.integer(*value, f, 0, vocab - 1);
      if (std::string_view(key) == "eos_token_id") m.eos_token_id = token;
    }
  }
  if (const auto it = model.find("name"); it != model.end() && it->is_string()) m.name = it->get<std::string>();
}

// Every graph with its manifest field path ("layers[3].moe.experts[5]"), in run order.
std::vector<std::pair<std::string, const GraphSpec*>> named_graphs(const Manifest& m) {
  std::vector<std::pair<std::string, const GraphSpec*>> out{{"embedding", &m.embedding}};
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const std::string f = "layers[" + std::to_string(i) + "]";
    out.emplace_back(f + ".stage", &m.layers[i].stage);
    if (m.layers[i].moe)
      for (size_t j = 0; j < m.layers[i].moe->experts.size(); ++j)
        out.emplace_back(f + ".moe.experts[" + std::to_string(j) + "]", &m.layers[i].moe->experts[j]);
  }
  out.emplace_back("head", &m.head);
  return out;
}

// Every path the manifest names outside files, with its field path.
std::vector<std::pair<std::string, std::string>> named_paths(const Manifest& m) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [field, graph] : named_graphs(m)) out.emplace_back(field + ".file", graph->file);
  for (size_t i = 0; i < m.layers.size(); ++i)
    if (m.layers[i].moe && !m.layers[i].moe->router.empty())
      out.emplace_back("layers[" + std::to_string(i) + "].moe.router", m.layers[i].moe->router);
  if (!m.tokenizer.empty()) out.emplace_back("tokenizer", m.tokenizer);
  if (!m.routing.empty()) out.emplace_back("routing", m.routing);
  return out;
}

std::string files_field(const std::string& rel) { return "files[" + clip(json_string(rel), 120) + "]"; }

// A listed file's path in a message about the file: as written, on one line, not overlong.
std::string file_name(const std::string& rel) { return clip(printable(rel), 300); }

// ---- ONNX external data: the `location` of every tensor an ONNX model stores outside itself, read
// from the protobuf wire format (field numbers from onnx.proto, IR version 10) without the onnx library.

constexpr uint64_t kModelGraph = 7, kModelFunctions = 25, kFunctionNode = 7;
constexpr uint64_t kGraphNode = 1, kGraphInitializer = 5, kGraphSparseInitializer = 15, kNodeAttribute = 5;
constexpr uint64_t kAttrTensor = 5, kAttrGraph = 6, kAttrTensors = 10, kAttrGraphs = 11, kAttrSparse = 22, kAttrSparses = 23;
constexpr uint64_t kTensorExternalData = 13, kSparseValues = 1, kSparseIndices = 2, kEntryKey = 1, kEntryValue = 2;
constexpr int kMaxGraphDepth = 32;  // nested subgraphs (If/Loop bodies); deeper is malformed or hostile

struct Malformed {};

struct Field {
  uint64_t number;  // 0 when the tag did not fit 64 bits (a field no walker looks for)
  size_t start, end;
};

// One varint at `pos`; `overflow` is set when it does not fit 64 bits.
uint64_t varint(std::string_view buf, size_t& pos, size_t end, bool& overflow) {
  uint64_t value = 0;
  overflow = false;
  for (int shift = 0;; shift += 7) {
    if (pos >= end || shift > 63) throw Malformed{};
    const auto byte = static_cast<unsigned char>(buf[pos++]);
    const uint64_t bits = byte & 0x7Fu;
    if (shift == 63 && bits > 1) overflow = true;
    value |= bits << shift;
    if (byte < 0x80) return value;
  }
}

// The length-delimited fields of the message in [start, end); other wire types are skipped.
std::vector<Field> fields(std::string_view buf, size_t start, size_t end) {
  std::vector<Field> out;
  size_t pos = start;
  while (pos < end) {
    bool overflow = false;
    const uint64_t tag = varint(buf, pos, end, overflow);
    const uint64_t number = overflow ? 0 : tag >> 3;
    switch (tag & 7) {
      case 0:
        varint(buf, pos, end, overflow);
        break;
      case 1:
        pos += 8;
        break;
      case 5:
        pos += 4;
        break;
      case 2: {
        const uint64_t size = varint(buf, pos, end, overflow);
        if (overflow || size > end - pos) throw Malformed{};
        out.push_back({number, pos, pos + static_cast<size_t>(size)});
        pos += static_cast<size_t>(size);
        break;
      }
      default:
        throw Malformed{};
    }
    if (pos > end) throw Malformed{};
  }
  return out;
}

bool valid_utf8(std::string_view text) {
  for (size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    size_t n = 0;
    uint32_t code = 0, least = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      n = 1, code = c & 0x1Fu, least = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2, code = c & 0x0Fu, least = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3, code = c & 0x07u, least = 0x10000;
    } else {
      return false;
    }
    if (i + n >= text.size()) return false;  // the sequence runs past the end
    for (size_t k = 1; k <= n; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      if ((next & 0xC0) != 0x80) return false;
      code = (code << 6) | (next & 0x3Fu);
    }
    if (code < least || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

void walk_tensor(std::string_view buf, size_t start, size_t end, std::vector<std::string>& out) {
  for (const Field& entry : fields(buf, start, end)) {
    if (entry.number != kTensorExternalData) continue;
    std::optional<std::string_view> key, value;
    for (const Field& f : fields(buf, entry.start, entry.end)) {
      if (f.number == kEntryKey) key = buf.substr(f.start, f.end - f.start);
      if (f.number == kEntryValue) value = buf.substr(f.start, f.end - f.start);
    }
    if (key && *key == "location") {
      const std::string_view location = value.value_or(std::string_view());
      if (!valid_utf8(location)) throw Malformed{};
      out.emplace_back(location);
    }
  }
}

void walk_sparse(std::string_view buf, size_t start, size_t end, std::vector<std::string>& out) {
  for (const Field& f : fields(buf, start, end))
    if (f.number == kSparseValues || f.number == kSparseIndices) walk_tensor(buf, f.start, f.end, out);
}

void walk_graph(std::string_view buf, size_t start, size_t end, std::vector<std::string>& out, int depth);

void walk_node(std::string_view buf, size_t start, size_t end, std::vector<std::string>& out, int depth) {
  for (const Field& attribute : fields(buf, start, end)) {
    if (attribute.number != kNodeAttribute) continue;
    for (const Field& f : fields(buf, attribute.start, attribute.end)) {
      if (f.number == kAttrTensor || f.number == kAttrTensors) walk_tensor(buf, f.start, f.end, out);
      if (f.number == kAttrGraph || f.number == kAttrGraphs) walk_graph(buf, f.start, f.end, out, depth + 1);
      if (f.number == kAttrSparse || f.number == kAttrSparses) walk_sparse(buf, f.start, f.end, out);
    }
  }
}

void walk_graph(std::string_view buf, size_t start, size_t end, std::vector<std::string>& out, int depth) {
  if (depth > kMaxGraphDepth) throw Malformed{};
  for (const Field& f : fields(buf, start, end)) {
    if (f.number == kGraphInitializer) walk_tensor(buf, f.start, f.end, out);
    if (f.number == kGraphSparseInitializer) walk_sparse(buf, f.start, f.end, out);
    if (f.number == kGraphNode) walk_node(buf, f.start, f.end, out, depth);
  }
}

// posixpath.normpath of a relative path: "." and empty parts dropped, ".." climbs (kept at the start).
std::string normalise(const std::string& path) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (;;) {
    const size_t end = path.find('/', start);
    const std::string part = path.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (part == "..") {
      if (!parts.empty() && parts.back() != "..") {
        parts.pop_back();
      } else {
        parts.push_back(part);
      }
    } else if (!part.empty() && part != ".") {
      parts.push_back(part);
    }
    if (end == std::string::npos) break;
    start = end + 1;
  }
  std::string out;
  for (const auto& part : parts) out += (out.empty() ? "" : "/") + part;
  return out.empty() ? "." : out;
}

// The whole of a listed graph file (a regular file by check_files' stat).
std::string read_graph_file(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  struct stat info {};
  if (fd.get() < 0 || ::fstat(fd.get(), &info) != 0)
    throw Error("cannot read " + clip(printable(path), 300) + " (" + std::strerror(errno) + ")");
  if (!S_ISREG(info.st_mode)) throw Error("cannot read " + clip(printable(path), 300) + ": not a regular file");
  std::string data;
  data.reserve(static_cast<size_t>(info.st_size));
  char block[1 << 16];
  for (;;) {
    const ssize_t got = ::read(fd.get(), block, sizeof block);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw Error("cannot read " + clip(printable(path), 300) + " (" + std::strerror(errno) + ")");
    if (got == 0) break;
    data.append(block, static_cast<size_t>(got));
  }
  return data;
}

std::string bundle_folder(const std::string& bundle_dir) {
  std::string dir = bundle_dir.empty() ? "." : bundle_dir;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return dir;
}

}  // namespace

int64_t Manifest::expert_bytes() const {
  int64_t total = 0;
  for (const auto& layer : layers)
    if (layer.moe)
      for (const auto& g : layer.moe->experts)
        if (__builtin_add_overflow(total, g.bytes, &total) || total > kMaxBytes) return kMaxBytes;
  return total;
}

std::string sha256_file(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  if (fd.get() < 0) throw Error("cannot read " + printable(path) + " (" + std::strerror(errno) + ")");
  struct stat info {};
  if (::fstat(fd.get(), &info) != 0 || !S_ISREG(info.st_mode))
    throw Error("cannot read " + printable(path) + ": not a regular file");
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Error("OpenSSL sha256 is unavailable");
  std::vector<char> block(1 << 20);
  for (;;) {
    const ssize_t got = ::read(fd.get(), block.data(), block.size());
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw Error("cannot read " + printable(path) + " (" + std::strerror(errno) + ")");
    if (got == 0) break;
    EVP_DigestUpdate(ctx.get(), block.data(), static_cast<size_t>(got));
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_DigestFinal_ex(ctx.get(), digest, &size);
  std::string hex;
  char buf[3];
  for (unsigned int i = 0; i < size; ++i) {
    std::snprintf(buf, sizeof buf, "%02x", digest[i]);
    hex += buf;
  }
  return hex;
}

std::vector<std::string> onnx_external_locations(const std::string& model) {
  const std::string_view buf(model);
  std::vector<std::string> out;
  try {
    for (const Field& f : fields(buf, 0, buf.size())) {
      if (f.number == kModelGraph) walk_graph(buf, f.start, f.end, out, 0);
      if (f.number == kModelFunctions)
        for (const Field& g : fields(buf, f.start, f.end))
          if (g.number == kFunctionNode) walk_node(buf, g.start, g.end, out, 1);
    }
  } catch (const Malformed&) {
    throw Error("not a well-formed ONNX protobuf");
  }
  return out;
}

Manifest parse_manifest(const std::string& text, const std::string& bundle_dir, const std::string& where) {
  const std::string dir = bundle_folder(bundle_dir);
  const json raw = parse_json(text, where);
  const Reader r(where);
  r.object(raw, "the manifest");
  const json* format = Reader::optional(raw, "format");
  if (format == nullptr || !format->is_string() || format->get_ref<const std::string&>() != "moedge-bundle")
    throw Error(where + " is not a moedge bundle manifest (format " + (format ? show(*format) : "null") + ")");
  const json* version = Reader::optional(raw, "schema_version");
  if (version == nullptr || !version->is_number_integer() ||
      (version->is_number_unsigned() && version->get<uint64_t>() > static_cast<uint64_t>(kSchemaVersion)))
    throw Error(where + " has schema version " + (version ? show(*version) : "null") + "; this moedge_rt reads up to " +
                std::to_string(kSchemaVersion) + ": upgrade moedge_rt");
  Manifest m;
  m.schema_version = static_cast<int>(r.integer(*version, "schema_version", 1, kSchemaVersion));
  parse_model(r, r.get(raw, "model", "model"), m);

  const json& files = r.object(r.get(raw, "files", "files"), "files");
  for (auto it = files.begin(); it != files.end(); ++it) {
    const std::string& rel = it.key();
    const std::string f = files_field(rel);
    if (!normalised_relative(rel)) r.not_inside(f, show_text(rel));
    const json& entry = r.object(it.value(), f);
    const json& sha = r.get(entry, "sha256", f + ".sha256");
    if (!is_sha256_hex(sha)) r.fail(f + ".sha256", "a 64-digit lowercase hex sha256", sha);
    const int64_t bytes = r.integer_at(entry, "bytes", f + ".bytes", 0, kMaxBytes);
    m.files[rel] = {sha.get<std::string>(), bytes};
  }

  const json& layers = r.array(r.get(raw, "layers", "layers"), "layers", true);
  const json& model = raw["model"];
  for (const char* key : {"num_layers", "num_hidden_layers"}) {
    const json* count = Reader::optional(model, key);
    if (count != nullptr && !(count->is_number_unsigned() && count->get<uint64_t>() == layers.size()))
      r.fail(std::string("model.") + key, "the number of layers listed (" + std::to_string(layers.size()) + ")", *count);
  }
  if (const json* quantization = Reader::optional(raw, "quantization")) r.object(*quantization, "quantization");
  m.precision = r.string(r.get(raw, "precision", "precision"), "precision");
  m.embedding = parse_graph(r, r.get(raw, "embedding", "embedding"), "embedding");
  for (size_t i = 0; i < layers.size(); ++i) m.layers.push_back(parse_layer(r, layers[i], i));
  m.head = parse_graph(r, r.get(raw, "head", "head"), "head");
  if (const json* tokenizer = Reader::optional(raw, "tokenizer")) m.tokenizer = r.path(*tokenizer, "tokenizer");
  if (const json* routing = Reader::optional(raw, "routing")) m.routing = r.path(*routing, "routing");
  if (const auto extra = raw.find("extra"); extra != raw.end()) r.object(*extra, "extra");

  for (const auto& [field, rel] : named_paths(m))
    if (m.files.count(rel) == 0) throw Error(where + ": " + field + " " + show_text(rel) + " is not listed under files");
  std::unordered_set<std::string> used;
  for (const auto& [field, graph] : named_graphs(m))
    if (!used.insert(graph->file).second)
      throw Error(where + ": " + field + " " + show_text(graph->file) + " is used by two graphs");

  // Where each listed file leads once symlinks are resolved: inside the bundle, or the bundle is refused.
  const std::string root = real_path(dir);
  if (root.empty()) throw Error("cannot open bundle " + printable(dir) + " (" + std::strerror(errno) + ")");
  for (const auto& [rel, entry] : m.files)
    if (!lies_inside(root, resolve_inside(root, rel))) r.not_inside(files_field(rel), show_text(rel));
  return m;
}

void check_files(const std::string& bundle_dir, const Manifest& manifest, bool hashes) {
  const std::string dir = bundle_folder(bundle_dir);
  for (const auto& [rel, entry] : manifest.files) {
    struct stat info {};
    if (::stat((dir + "/" + rel).c_str(), &info) != 0)
      throw Error("bundle " + printable(dir) + " is missing " + file_name(rel) + ": copy the whole bundle folder");
    if (!S_ISREG(info.st_mode)) throw Error("bundle file " + file_name(rel) + " is not a regular file: re-copy the bundle");
    if (static_cast<int64_t>(info.st_size) != entry.bytes)
      throw Error("bundle file " + file_name(rel) + " has " + std::to_string(static_cast<int64_t>(info.st_size)) +
                  " bytes, the manifest says " + std::to_string(entry.bytes) + ": re-copy the bundle");
  }
  // What each graph makes ONNX Runtime read besides itself: listed files only (so confined, regular
  // and, with hashes, verified).
  for (const auto& [field, graph] : named_graphs(manifest)) {
    const std::string path = dir + "/" + graph->file;
    const std::string model = read_graph_file(path);
    std::vector<std::string> locations;
    try {
      locations = onnx_external_locations(model);
    } catch (const Error&) {
      throw Error(clip(printable(path), 300) +
                  " is not a readable ONNX model (malformed protobuf): re-export or re-split it");
    }
    const size_t slash = graph->file.rfind('/');
    const std::string base = slash == std::string::npos ? "" : graph->file.substr(0, slash);
    std::unordered_set<std::string> seen;
    for (const std::string& location : locations) {
      if (!seen.insert(location).second) continue;
      const bool plain = !location.empty() && location[0] != '/' && location.find('\\') == std::string::npos;
      const std::string rel = plain ? normalise(base.empty() ? location : base + "/" + location) : "";
      if (!plain || rel == ".." || rel.rfind("../", 0) == 0 || manifest.files.count(rel) == 0)
        throw Error("bundle graph " + file_name(graph->file) + " (" + field + ") reads external data " +
                    clip(repr(location), 120) + ", which is not a file listed under files: " + kResplit);
    }
  }
  if (!hashes) return;
  for (const auto& [rel, entry] : manifest.files)
    if (sha256_file(dir + "/" + rel) != entry.sha256)
      throw Error("bundle file " + file_name(rel) +
                  " does not match its sha256 in manifest.json: re-copy or re-split the bundle");
}

Manifest read_manifest(const std::string& bundle_dir, bool verify) {
  const std::string dir = bundle_folder(bundle_dir);
  const std::string path = dir + "/manifest.json";
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0 || !S_ISREG(info.st_mode))
    throw Error(printable(dir) + " is not a moedge bundle (no manifest.json): run `moedge split` first");
  const std::string where = printable(path);
  const Manifest m = parse_manifest(read_small_file(path, where, "not a moedge manifest"), dir, where);
  check_files(dir, m, verify);
  return m;
}

std::vector<std::pair<int, int>> read_plan(const std::string& path) {
  const std::string where = printable(path);
  const std::string fix = "pass a plan file written by `moedge profile --plan`";
  const json doc = parse_json(read_small_file(path, "plan file " + where, fix), where);
  const json* format = doc.is_object() ? Reader::optional(doc, "format") : nullptr;
  if (format == nullptr || !format->is_string() || format->get_ref<const std::string&>() != "moedge-placement")
    throw Error(where + " is not a moedge placement plan: write one with `moedge profile --plan`");
  const Reader r(where);
  const json& experts = r.array(r.get(doc, "experts", "experts"), "experts");
  std::vector<std::pair<int, int>> out;
  for (size_t i = 0; i < experts.size(); ++i) {
    const json& key = experts[i];
    const auto in_range = [](const json& v) {
      return v.is_number_unsigned() && v.get<uint64_t>() < static_cast<uint64_t>(kMaxVocab);
    };
    if (!key.is_array() || key.size() != 2 || !in_range(key[0]) || !in_range(key[1]))
      r.fail("experts[" + std::to_string(i) + "]", "a [layer, expert] pair of integers", key);
    out.emplace_back(key[0].get<int>(), key[1].get<int>());
  }
  return out;
}

std::vector<std::pair<int, int>> read_plan(const std::string& path, const Manifest& bundle) {
  auto plan = read_plan(path);
  const std::string where = printable(path);
  for (size_t i = 0; i < plan.size(); ++i) {
    const auto [layer, expert] = plan[i];
    const std::string f = where + ": experts[" + std::to_string(i) + "]";
    if (static_cast<size_t>(layer) >= bundle.layers.size() || !bundle.layers[static_cast<size_t>(layer)].moe)
      throw Error(f + " names layer " + std::to_string(layer) + ", which is not an MoE layer of this bundle: " +
                  kWritePlan);
    const int experts = bundle.layers[static_cast<size_t>(layer)].moe->num_experts;
    if (expert >= experts)
      throw Error(f + " names expert " + std::to_string(expert) + " of layer " + std::to_string(layer) + ", which has " +
                  std::to_string(experts) + " experts: " + kWritePlan);
  }
  return plan;
}

}  // namespace moedge
