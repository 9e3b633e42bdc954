// Placement plans (`moedge profile --plan`): the experts they pin, each checked against the bundle.
#include <string>
#include <utility>
#include <vector>

#include "bundle_internal.h"

namespace moedge {

using namespace detail;

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
    if (bundle.layers[static_cast<size_t>(layer)].moe->experts_in_graph)
      throw Error(f + " names layer " + std::to_string(layer) + ", whose experts run inside its stage graph " +
                  "(moedge split --experts-in-graph): a plan needs a bundle split without --experts-in-graph");
    const int experts = bundle.layers[static_cast<size_t>(layer)].moe->num_experts;
    if (expert >= experts)
      throw Error(f + " names expert " + std::to_string(expert) + " of layer " + std::to_string(layer) + ", which has " +
                  std::to_string(experts) + " experts: " + kWritePlan);
  }
  return plan;
}

}  // namespace moedge
