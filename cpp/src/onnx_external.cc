// ONNX external data: the `location` of every tensor an ONNX model stores outside itself, read from the
// protobuf wire format (field numbers from onnx.proto, IR version 10) without the onnx library.
// check_files requires each location to be a file listed under the manifest's files.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "moedge/runtime.h"
#include "utf8.h"

namespace moedge {
namespace {

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
  std::u32string ignored;
  return decode_utf8(text, &ignored);
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

}  // namespace

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

}  // namespace moedge
