// manifest.json: parsed with nlohmann/json and checked field by field before any bundle file is opened
// (types, ranges, each layer's stage or the earlier stage whose span runs it, paths relative and confined
// to the bundle, every path listed under files, no file used by two graphs). Every failure is one Error naming the manifest field (mirrors moedge.formats.manifest).
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include "bundle_internal.h"

namespace moedge {
namespace detail {
namespace {

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
    if (const auto it = moe->find("experts_in_graph"); it != moe->end())
      spec.experts_in_graph = r.boolean(*it, fm + ".experts_in_graph");
    if (spec.experts_in_graph && !experts.empty())
      r.fail_shown(fm + ".experts", "[] (the experts run inside the stage graph)",
                   show_text(std::to_string(experts.size()) + " graphs"));
    if (spec.experts_in_graph && Reader::optional(*moe, "router") != nullptr)
      r.fail(fm + ".router", "null (the experts run inside the stage graph)", (*moe)["router"]);
    if (!spec.experts_in_graph && experts.size() != static_cast<size_t>(spec.num_experts))
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
  const json& stage = r.get(d, "stage", f + ".stage");
  if (!stage.is_null()) layer.stage = parse_graph(r, stage, f + ".stage");
  if (const auto span = d.find("span"); span != d.end())  // absent: 1; null is not an integer
    layer.span = static_cast<int>(r.integer(*span, f + ".span", 1, kMaxLayers));
  return layer;
}

// Every layer has a stage or lies in an earlier stage's span of dense layers (or MoE layers whose experts
// run inside the graph).
void check_spans(const Reader& r, const std::vector<LayerSpec>& layers) {
  int64_t covered_to = -1;  // the last layer the latest stage runs
  const auto count = static_cast<int64_t>(layers.size());
  for (int64_t i = 0; i < count; ++i) {
    const LayerSpec& layer = layers[static_cast<size_t>(i)];
    const std::string f = "layers[" + std::to_string(i) + "]";
    const bool separate = layer.moe && !layer.moe->experts_in_graph;
    if (!layer.stage) {
      if (i > covered_to) r.fail(f + ".stage", "a graph (no earlier layer's stage spans this layer)", json(nullptr));
      if (separate) r.fail_shown(f + ".moe", "null (a layer inside a span is dense)", show_text("an MoE layer"));
      if (layer.span != 1) r.fail_shown(f + ".span", "1 (the layer has no stage)", std::to_string(layer.span));
      continue;
    }
    if (i <= covered_to)
      r.fail_shown(f + ".stage", "null (an earlier layer's stage spans this layer)", show_text("a graph"));
    if (layer.span > 1 && separate) r.fail_shown(f + ".span", "1 for an MoE layer", std::to_string(layer.span));
    if (i + layer.span > count)
      r.fail_shown(f + ".span", "at most " + std::to_string(count - i) + " (the layers from here on)",
                   std::to_string(layer.span));
    covered_to = i + layer.span - 1;
  }
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

// Every path the manifest names outside files, with its field path.
std::vector<std::pair<std::string, std::string>> named_paths(const Manifest& m) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [field, graph] : named_graphs(m)) out.emplace_back(field + ".file", graph->file);
  for (size_t i = 0; i < m.layers.size(); ++i)
    if (m.layers[i].moe && !m.layers[i].moe->router.empty())
      out.emplace_back("layers[" + std::to_string(i) + "].moe.router", m.layers[i].moe->router);
  if (!m.tokenizer.empty()) out.emplace_back("tokenizer", m.tokenizer);
  if (!m.routing.empty()) out.emplace_back("routing", m.routing);
  if (!m.rotary.empty()) out.emplace_back("rotary", m.rotary);
  return out;
}

}  // namespace

std::vector<std::pair<std::string, const GraphSpec*>> named_graphs(const Manifest& m) {
  std::vector<std::pair<std::string, const GraphSpec*>> out{{"embedding", &m.embedding}};
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const std::string f = "layers[" + std::to_string(i) + "]";
    if (m.layers[i].stage) out.emplace_back(f + ".stage", &*m.layers[i].stage);
    if (m.layers[i].moe)
      for (size_t j = 0; j < m.layers[i].moe->experts.size(); ++j)
        out.emplace_back(f + ".moe.experts[" + std::to_string(j) + "]", &m.layers[i].moe->experts[j]);
  }
  out.emplace_back("head", &m.head);
  return out;
}

std::string files_field(const std::string& rel) { return "files[" + clip(json_string(rel), 120) + "]"; }

std::string file_name(const std::string& rel) { return clip(printable(rel), 300); }

}  // namespace detail

using namespace detail;

int64_t Manifest::expert_bytes() const {
  int64_t total = 0;
  for (const auto& layer : layers)
    if (layer.moe)
      for (const auto& g : layer.moe->experts)
        if (__builtin_add_overflow(total, g.bytes, &total) || total > kMaxBytes) return kMaxBytes;
  return total;
}

bool Manifest::experts_in_graph() const {
  for (const auto& layer : layers)
    if (layer.moe && layer.moe->experts_in_graph) return true;
  return false;
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
  if (const auto target = raw.find("stage_target"); target != raw.end()) {  // absent: tensorrt; null is refused
    if (!target->is_string() || (*target != "tensorrt" && *target != "ort-cpu"))
      r.fail("stage_target", "'tensorrt' or 'ort-cpu'", *target);
    m.stage_target = target->get<std::string>();
  }
  const json* rotary = Reader::optional(raw, "rotary");
  if (m.stage_target == "ort-cpu" && rotary == nullptr)
    r.fail("rotary", "the cos/sin table file an ort-cpu bundle's stages read", json(nullptr));
  if (rotary != nullptr) m.rotary = r.path(*rotary, "rotary");
  if (const auto extra = raw.find("extra"); extra != raw.end()) r.object(*extra, "extra");
  check_spans(r, m.layers);
  if (m.experts_in_graph()) {
    if (m.schema_version < 2)
      r.fail("schema_version", "2 (a bundle with experts_in_graph layers)", json(m.schema_version));
    if (m.stage_target != "ort-cpu")
      r.fail("stage_target", "'ort-cpu' (the only target with experts_in_graph)", json(m.stage_target));
  }

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

}  // namespace moedge
