// UTF-8 decoding shared by the budget grammar and the ONNX external-data scanner.
#include "utf8.h"

namespace moedge {

bool decode_utf8(std::string_view text, std::u32string* out) {
  for (size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    size_t n = 0;
    char32_t code = 0, least = 0;
    if (c < 0x80) {
      n = 0, code = c;
    } else if ((c & 0xE0) == 0xC0) {
      n = 1, code = c & 0x1Fu, least = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2, code = c & 0x0Fu, least = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3, code = c & 0x07u, least = 0x10000;
    } else {
      return false;
    }
    if (n >= text.size() - i) return false;  // the sequence runs past the end
    for (size_t k = 1; k <= n; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      if ((next & 0xC0) != 0x80) return false;
      code = (code << 6) | (next & 0x3Fu);
    }
    if (n > 0 && (code < least || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF))) return false;
    out->push_back(code);
    i += n + 1;
  }
  return true;
}

}  // namespace moedge
