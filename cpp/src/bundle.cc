// The bundle format on disk: manifest.json (parsed with nlohmann/json), file hashes (OpenSSL), plans.
#include <openssl/evp.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "moedge/runtime.h"

namespace moedge {
namespace {

using nlohmann::json;

json read_json(const std::string& path, const std::string& what) {
  std::ifstream in(path);
  if (!in) throw Error("cannot open " + path + ": " + what);
  try {
    return json::parse(in);
  } catch (const json::parse_error& e) {
    throw Error(path + " is not valid JSON (" + e.what() + ")");
  }
}

GraphSpec parse_graph(const json& j) {
  GraphSpec g;
  g.file = j.at("file").get<std::string>();
  for (const auto& t : j.at("inputs")) g.inputs.push_back({t.at("name"), t.at("dtype")});
  for (const auto& t : j.at("outputs")) g.outputs.push_back({t.at("name"), t.value("dtype", "float32")});
  g.bytes = j.at("bytes").get<int64_t>();
  return g;
}

}  // namespace

int64_t Manifest::expert_bytes() const {
  int64_t total = 0;
  for (const auto& layer : layers)
    if (layer.moe)
      for (const auto& g : layer.moe->experts) total += g.bytes;
  return total;
}

std::string sha256_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + path);
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Error("OpenSSL sha256 is unavailable");
  std::vector<char> block(1 << 20);
  while (in) {
    in.read(block.data(), static_cast<std::streamsize>(block.size()));
    if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), block.data(), static_cast<size_t>(in.gcount()));
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

Manifest read_manifest(const std::string& bundle_dir, bool verify) {
  const std::string path = bundle_dir + "/manifest.json";
  {
    std::ifstream probe(path);
    if (!probe) throw Error(bundle_dir + " is not a moedge bundle (no manifest.json): run `moedge split` first");
  }
  const json raw = read_json(path, "");
  if (raw.value("format", "") != "moedge-bundle") throw Error(path + " is not a moedge bundle manifest");
  if (!raw.contains("schema_version") || !raw["schema_version"].is_number_integer())
    throw Error(path + " has no integer schema_version");
  Manifest m;
  m.schema_version = raw["schema_version"].get<int>();
  if (m.schema_version > kSchemaVersion)
    throw Error(path + " has schema version " + std::to_string(m.schema_version) + "; this moedge_rt reads up to " +
                std::to_string(kSchemaVersion) + ": upgrade moedge_rt");
  try {
    const json& model = raw.at("model");
    m.precision = raw.at("precision").get<std::string>();
    m.name = model.value("name", "");
    m.num_kv_heads = model.at("num_kv_heads").get<int>();
    m.head_dim = model.at("head_dim").get<int>();
    if (model.contains("vocab_size") && model["vocab_size"].is_number_integer())
      m.vocab_size = model["vocab_size"].get<int64_t>();
    if (model.contains("max_position_embeddings") && model["max_position_embeddings"].is_number_integer())
      m.context = model["max_position_embeddings"].get<int64_t>();
    if (model.contains("eos_token_id") && model["eos_token_id"].is_number_integer())
      m.eos_token_id = model["eos_token_id"].get<int64_t>();
    m.embedding = parse_graph(raw.at("embedding"));
    m.head = parse_graph(raw.at("head"));
    for (const auto& l : raw.at("layers")) {
      LayerSpec layer;
      layer.index = l.at("index").get<int>();
      layer.stage = parse_graph(l.at("stage"));
      if (l.contains("moe") && !l["moe"].is_null()) {
        const json& moe = l["moe"];
        MoeSpec spec;
        spec.num_experts = moe.at("num_experts").get<int>();
        const json& g = moe.at("gating");
        spec.gating = {g.at("scoring").get<std::string>(), g.at("top_k").get<int>(), g.at("normalize_top_k").get<bool>(),
                       g.value("shared_expert", false)};
        for (const auto& e : moe.at("experts")) spec.experts.push_back(parse_graph(e));
        if (static_cast<int>(spec.experts.size()) != spec.num_experts)
          throw Error(path + ": layer " + std::to_string(layer.index) + " lists " + std::to_string(spec.experts.size()) +
                      " expert graphs for " + std::to_string(spec.num_experts) + " experts");
        layer.moe = std::move(spec);
      }
      m.layers.push_back(std::move(layer));
    }
    for (const auto& [rel, entry] : raw.at("files").items())
      m.files[rel] = {entry.at("sha256").get<std::string>(), entry.at("bytes").get<int64_t>()};
  } catch (const json::exception& e) {
    throw Error(path + " is missing or mangles a field (" + e.what() + ")");
  }
  if (verify) {
    for (const auto& [rel, entry] : m.files) {
      const std::string file = bundle_dir + "/" + rel;
      std::ifstream in(file, std::ios::binary | std::ios::ate);
      if (!in) throw Error("bundle " + bundle_dir + " is missing " + rel + ": copy the whole bundle folder");
      if (static_cast<int64_t>(in.tellg()) != entry.bytes)
        throw Error("bundle " + bundle_dir + ": " + rel + " has " + std::to_string(static_cast<int64_t>(in.tellg())) +
                    " bytes, the manifest says " + std::to_string(entry.bytes) + ": re-copy the bundle");
      if (sha256_file(file) != entry.sha256)
        throw Error("bundle " + bundle_dir + ": " + rel +
                    " does not match its sha256 in manifest.json (corrupted or edited): re-copy or re-split the bundle");
    }
  }
  return m;
}

std::vector<std::pair<int, int>> read_plan(const std::string& path) {
  const json doc = read_json(path, "pass a plan file written by `moedge profile --plan`");
  if (!doc.is_object() || doc.value("format", "") != "moedge-placement")
    throw Error(path + " is not a moedge placement plan: write one with `moedge profile --plan`");
  std::vector<std::pair<int, int>> out;
  try {
    for (const auto& k : doc.at("experts")) out.emplace_back(k.at(0).get<int>(), k.at(1).get<int>());
  } catch (const json::exception& e) {
    throw Error(path + ": malformed experts list (" + e.what() + ")");
  }
  return out;
}

}  // namespace moedge
