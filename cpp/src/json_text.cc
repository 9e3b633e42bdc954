// Values in one-line messages (printable, Python's repr, compact JSON, clipped) and JSON parsing whose
// error says where the text stops being JSON. Shared by the manifest and plan readers.
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "bundle_internal.h"

namespace moedge::detail {
namespace {

void append_hex_escape(std::string& out, unsigned char c) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "\\x%02x", c);
  out += buf;
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

}  // namespace

namespace {

// A control character as repr writes it (\n, \r, \t, else \xNN) appended to out; false for any other byte.
bool append_control_escape(std::string& out, unsigned char c) {
  if (c == '\n') {
    out += "\\n";
  } else if (c == '\r') {
    out += "\\r";
  } else if (c == '\t') {
    out += "\\t";
  } else if (c < 0x20 || c == 0x7f) {
    append_hex_escape(out, c);
  } else {
    return false;
  }
  return true;
}

}  // namespace

std::string printable(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char ch : text)
    if (!append_control_escape(out, static_cast<unsigned char>(ch))) out += ch;
  return out;
}

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
    } else if (append_control_escape(out, c)) {
    } else if (c == 0xC2 && i + 1 < text.size() && static_cast<unsigned char>(text[i + 1]) < 0xA0) {
      append_hex_escape(out, static_cast<unsigned char>(text[++i]));  // U+0080..U+009F, as repr does
    } else {
      out += text[i];
    }
  }
  return out + quote;
}

std::string json_string(const std::string& text) {
  return json(text).dump(-1, ' ', true, json::error_handler_t::replace);
}

std::string show_text(const std::string& text) {
  return clip(repr(std::string_view(text).substr(0, 4 * kShownChars)), kShownChars);
}

std::string show(const json& value) {
  if (value.is_string()) return show_text(value.get_ref<const std::string&>());
  std::string out;
  render(value, out, 4 * kShownChars);
  return clip(out, kShownChars);
}

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

}  // namespace moedge::detail
