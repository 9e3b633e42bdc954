// UTF-8 decoding shared by the budget grammar and the ONNX external-data scanner.
#pragma once

#include <string>
#include <string_view>

namespace moedge {

// `text` as code points appended to `out`; false when it is not valid UTF-8 (overlong forms, surrogates
// and code points past U+10FFFF included).
bool decode_utf8(std::string_view text, std::u32string* out);

}  // namespace moedge
