// moedge-cache-trace TABLE.json: replay the access traces of tests/data/expert_cache_traces.json through
// the Runner's expert cache and print, per case, what it did at every step as one JSON document on
// stdout (tests/integration/test_expert_cache_traces.py compares it with the Python runtime's).
//
// Each case is set up as Runner::Impl sets up its cache (make_expert_cache, then the plan pinned in
// order) and each step (layer, chosen experts) is met as Runner::Impl::moe meets it: the chosen experts
// in ascending index, each looked up (a hit), else run on the CPU and offered to the cache with the
// step's chosen experts protected. Output: {"cases": [{"name", "per_layer_slots": n or null, "steps":
// [{"hits", "admitted", "cpu": [expert...], "evicted": [[layer, expert]...] (in eviction order),
// "resident": [[layer, expert]...] (sorted), "used": bytes}]} or {"name", "error": message}]}.
// Exit 0, or 2 with a message on stderr when the table cannot be read.
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "expert_cache.h"
#include "moedge/runtime.h"

namespace {

using nlohmann::json;
using moedge::detail::ExpertCache;
using Key = ExpertCache::Key;

json pair_list(const std::vector<Key>& keys) {
  json out = json::array();
  for (const auto& [layer, expert] : keys) out.push_back({layer, expert});
  return out;
}

json replay(const json& row) {
  const auto layers = row.at("moe_layers").get<std::vector<int>>();
  const auto sizes = row.at("sizes").get<std::vector<std::vector<int64_t>>>();
  if (sizes.size() != layers.size()) throw std::runtime_error("sizes needs one list per MoE layer");
  std::map<Key, int64_t> bytes;
  std::vector<int64_t> all;
  for (size_t i = 0; i < layers.size(); ++i)
    for (size_t e = 0; e < sizes[i].size(); ++e) {
      bytes[{layers[i], static_cast<int>(e)}] = sizes[i][e];
      all.push_back(sizes[i][e]);
    }
  const std::string name = row.at("policy").get<std::string>();
  if (name != "lru" && name != "pinned") throw std::runtime_error("policy must be lru or pinned, got " + name);
  const auto policy = name == "lru" ? moedge::CachePolicy::Lru : moedge::CachePolicy::Pinned;
  json out = {{"name", row.at("name")}};
  try {
    ExpertCache cache = moedge::detail::make_expert_cache(row.at("budget").get<int64_t>(), policy, layers.size(), all);
    for (const auto& key : row.value("pinned", json::array()).get<std::vector<Key>>()) cache.pin(key, bytes.at(key));
    out["per_layer_slots"] = cache.per_layer_slots() > 0 ? json(cache.per_layer_slots()) : json(nullptr);
    json steps = json::array();
    for (const json& step : row.at("trace")) {
      const int layer = step.at(0).get<int>();
      const auto chosen = step.at(1).get<std::set<int>>();  // ascending, as Runner::Impl::moe runs them
      std::set<Key> protect;
      for (const int e : chosen) protect.emplace(layer, e);
      std::vector<int> hits, admitted, cpu;
      std::vector<Key> evicted;
      for (const int e : chosen) {
        const Key key{layer, e};
        if (cache.lookup(key)) {
          hits.push_back(e);
          continue;
        }
        for (const Key& victim : cache.admit(key, bytes.at(key), protect)) evicted.push_back(victim);
        (cache.resident(key) ? admitted : cpu).push_back(e);
      }
      std::vector<Key> resident;
      for (const auto& entry : cache.residents()) resident.push_back(entry.first);
      steps.push_back({{"hits", hits},
                       {"admitted", admitted},
                       {"cpu", cpu},
                       {"evicted", pair_list(evicted)},
                       {"resident", pair_list(resident)},
                       {"used", cache.used()}});
    }
    out["steps"] = steps;
  } catch (const moedge::Error& e) {
    out = {{"name", row.at("name")}, {"error", e.what()}};
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " TABLE.json\n";
    return 2;
  }
  try {
    std::ifstream in(argv[1]);
    if (!in) throw std::runtime_error(std::string("cannot read ") + argv[1]);
    const json table = json::parse(in);
    json cases = json::array();
    for (const json& row : table.at("cases")) cases.push_back(replay(row));
    std::cout << json{{"cases", cases}}.dump() << '\n';
  } catch (const std::exception& e) {
    std::cerr << "moedge-cache-trace: " << e.what() << '\n';
    return 2;
  }
  return 0;
}
