// The --gpu-budget grammar of the Python runtime, byte for byte: moedge.inputs.parse_budget_spec decides
// what is accepted and moedge.runtime.scheduler.parse_budget what it is in bytes. Python reads the text as
//   spec.strip().lower(), then "auto" | NUMBER "%" | NUMBER UNIT | NUMBER    (UNIT: gib mib kib gb mb kb b)
// where NUMBER is whatever Python's float() takes. This file implements str.strip, str.lower and float()
// for such text (Unicode whitespace and decimal digits as Python 3.11's Unicode 14.0 tables have them;
// tests/data/budget_grammar.json is the table both runtimes are tested against).
#include <locale.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

#include "moedge/runtime.h"
#include "utf8.h"

namespace moedge {
namespace {

constexpr const char* kHint = "give bytes (1.5GiB, 800MB, 4096) or a share of the expert bytes (25%)";

// What str.isspace() is true for.
bool is_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

// The first code point of every run of ten Unicode decimal digits (category Nd, 0 to 9), Unicode 14.0.
constexpr char32_t kDigitZeros[] = {
    0x30,    0x660,   0x6f0,   0x7c0,   0x966,   0x9e6,   0xa66,   0xae6,   0xb66,   0xbe6,   0xc66,
    0xce6,   0xd66,   0xde6,   0xe50,   0xed0,   0xf20,   0x1040,  0x1090,  0x17e0,  0x1810,  0x1946,
    0x19d0,  0x1a80,  0x1a90,  0x1b50,  0x1bb0,  0x1c40,  0x1c50,  0xa620,  0xa8d0,  0xa900,  0xa9d0,
    0xa9f0,  0xaa50,  0xabf0,  0xff10,  0x104a0, 0x10d30, 0x11066, 0x110f0, 0x11136, 0x111d0, 0x112f0,
    0x11450, 0x114d0, 0x11650, 0x116c0, 0x11730, 0x118e0, 0x11950, 0x11c50, 0x11d50, 0x11da0, 0x16a60,
    0x16ac0, 0x16b50, 0x1d7ce, 0x1d7d8, 0x1d7e2, 0x1d7ec, 0x1d7f6, 0x1e140, 0x1e2f0, 0x1e950, 0x1fbf0};

// The digit value of a Unicode decimal digit, else -1.
int decimal(char32_t c) {
  for (const char32_t zero : kDigitZeros)
    if (c >= zero && c < zero + 10) return static_cast<int>(c - zero);
  return -1;
}

// str.strip() then str.lower(), as far as the grammar can tell: only A-Z and the Kelvin sign (U+212A,
// lowercase 'k') lower to ASCII; any other non-ASCII letter stays non-ASCII, which the grammar refuses
// either way.
std::u32string strip_lower(const std::u32string& text) {
  size_t a = 0, b = text.size();
  while (a < b && is_space(text[a])) ++a;
  while (b > a && is_space(text[b - 1])) --b;
  std::u32string out;
  for (size_t i = a; i < b; ++i) {
    const char32_t c = text[i];
    out.push_back(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c == 0x212A ? U'k' : c);
  }
  return out;
}

bool ends_with(const std::u32string& text, const std::u32string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool digit(char c) { return c >= '0' && c <= '9'; }

// Python's float() of `text`, or nullopt where it raises ValueError. Its steps: non-ASCII whitespace to a
// space, non-ASCII decimal digits to ASCII ones (any other non-ASCII character fails); an underscore only
// between two digits, then dropped; space, \t, \n, \v, \f and \r stripped from both ends; then
// [sign] (digits [. [digits]] | . digits) [e [sign] digits], or [sign] inf, infinity or nan.
std::optional<double> python_float(const std::u32string& text) {
  std::string ascii;
  for (const char32_t c : text) {
    if (c < 127) {
      ascii += static_cast<char>(c);
    } else if (is_space(c)) {
      ascii += ' ';
    } else if (const int d = decimal(c); d >= 0) {
      ascii += static_cast<char>('0' + d);
    } else {
      return std::nullopt;
    }
  }
  std::string s;
  for (size_t i = 0; i < ascii.size(); ++i) {
    if (ascii[i] != '_') {
      s += ascii[i];
    } else if (i == 0 || i + 1 == ascii.size() || !digit(ascii[i - 1]) || !digit(ascii[i + 1])) {
      return std::nullopt;
    }
  }
  const auto py_space = [](char c) { return c == ' ' || (c >= '\t' && c <= '\r'); };
  size_t a = 0, b = s.size();
  while (a < b && py_space(s[a])) ++a;
  while (b > a && py_space(s[b - 1])) --b;
  s = s.substr(a, b - a);
  size_t pos = 0;
  const bool negative = !s.empty() && s[0] == '-';
  if (!s.empty() && (s[0] == '+' || s[0] == '-')) ++pos;
  const std::string rest = s.substr(pos);
  if (rest == "inf" || rest == "infinity") return negative ? -HUGE_VAL : HUGE_VAL;
  if (rest == "nan") return std::nan("");
  const auto digits = [&s](size_t& at) {
    const size_t start = at;
    while (at < s.size() && digit(s[at])) ++at;
    return at - start;
  };
  size_t mantissa = digits(pos);
  if (pos < s.size() && s[pos] == '.') {
    ++pos;
    mantissa += digits(pos);
  }
  if (mantissa == 0) return std::nullopt;
  if (pos < s.size() && s[pos] == 'e') {
    ++pos;
    if (pos < s.size() && (s[pos] == '+' || s[pos] == '-')) ++pos;
    if (digits(pos) == 0) return std::nullopt;
  }
  if (pos != s.size()) return std::nullopt;
  // The text is now plain decimal: strtod in the C locale rounds it correctly, as Python's dtoa does
  // (overflow to infinity, underflow to a subnormal or zero).
  static const locale_t c_locale = ::newlocale(LC_ALL_MASK, "C", static_cast<locale_t>(nullptr));
  return ::strtod_l(s.c_str(), nullptr, c_locale);
}

}  // namespace

Budget parse_budget(const std::string& text) {
  std::string shown;
  for (const char c : text.substr(0, 60)) shown += static_cast<unsigned char>(c) < 0x20 ? '?' : c;
  shown = "'" + shown + (text.size() > 60 ? "...'" : "'");
  std::u32string decoded;
  if (!decode_utf8(text, &decoded)) throw Error("cannot read GPU budget " + shown + ": " + kHint);
  const std::u32string t = strip_lower(decoded);
  if (t == U"auto")
    throw Error("GPU budget 'auto' is 90% of the free device memory, which only the Python runtime measures: " +
                std::string(kHint));
  if (ends_with(t, U"%")) {
    const auto value = python_float(t.substr(0, t.size() - 1));
    if (!value) throw Error("cannot read GPU budget " + shown + ": " + kHint);
    if (!std::isfinite(*value) || *value < 0 || *value > 100)
      throw Error("GPU budget " + shown + " is not a share between 0% and 100%: " + kHint);
    return {true, *value / 100};
  }
  struct Unit {
    const char32_t* suffix;
    double scale;
  };
  static constexpr Unit kUnits[] = {{U"gib", 1073741824.0}, {U"mib", 1048576.0}, {U"kib", 1024.0}, {U"gb", 1e9},
                                    {U"mb", 1e6},           {U"kb", 1e3},        {U"b", 1.0}};
  const Unit* unit = nullptr;
  for (const Unit& u : kUnits)
    if (ends_with(t, u.suffix)) {
      unit = &u;
      break;
    }
  const auto value = python_float(unit ? t.substr(0, t.size() - std::char_traits<char32_t>::length(unit->suffix)) : t);
  if (!value) throw Error("cannot read GPU budget " + shown + ": " + kHint);
  if (!std::isfinite(*value) || *value < 0)
    throw Error("GPU budget " + shown + " must be a finite amount of at least 0: " + kHint);
  if (unit) return {false, *value * unit->scale};
  return *value <= 1 ? Budget{true, *value} : Budget{false, *value};
}

int64_t Budget::bytes(int64_t expert_bytes) const {
  const double amount = share ? value * static_cast<double>(expert_bytes) : value;
  // int() of Python truncates; 2^62 and more (or +inf, from 1e308GiB) saturate at kMaxBytes.
  if (!(amount < static_cast<double>(kMaxBytes))) return kMaxBytes;
  return amount <= 0 ? 0 : static_cast<int64_t>(amount);
}

}  // namespace moedge
