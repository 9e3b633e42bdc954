// The MoE layer: route each token by the manifest's gating rule, run every chosen expert once on its
// tokens (on the provider when resident, else on the CPU, then offered to the cache, which evicts none
// of the layer's chosen experts for it, as moedge.runtime.scheduler.ExpertScheduler.dispatch protects
// them), and add the weighted outputs in ascending expert index, so the sums match moedge.runtime bit
// for bit.
#include <algorithm>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "runner_internal.h"

namespace moedge {
namespace detail {

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<int64_t> float_shape(const Ort::Value& value, const std::string& what) {
  if (!value.IsTensor()) throw Error(what + " is not a tensor");
  auto info = value.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw Error(what + " is not float32");
  return info.GetShape();
}

Ort::Value& need(Values& values, const std::string& name, const std::string& graph) {
  const auto it = values.find(name);
  if (it == values.end())
    throw Error(graph + " does not output " + name + ", which moedge_rt needs: re-split the bundle with moedge split");
  return it->second;
}

const TensorSpec& first(const std::vector<TensorSpec>& specs, const GraphSpec& g, const char* what) {
  if (specs.empty()) throw Error(g.file + " has no " + what + " in manifest.json: re-split the bundle with moedge split");
  return specs.front();
}

}  // namespace detail

using namespace detail;

Ort::Session& Runner::Impl::expert_session(const Key& key, const GraphSpec& g, bool* on_cpu) {
  *on_cpu = false;
  if (!cache) {  // no budget: every expert lives on the provider
    auto& s = resident[key];
    if (!s) s = open(g, provider_options);
    ++stats.hits;
    return *s;
  }
  if (cache->lookup(key)) {
    if (auto it = resident.find(key); it != resident.end()) {
      ++stats.hits;
      return *it->second;
    }
    cache->forget(key);  // resident by the books but never opened: run it on the CPU
  }
  *on_cpu = true;
  ++stats.cpu_runs;
  auto& s = cpu[key];
  if (!s) s = open(g, cpu_options);
  return *s;
}

void Runner::Impl::after_miss(const Key& key, const GraphSpec& g, const std::set<Key>& protect) {
  for (const Key& victim : cache->admit(key, g.bytes, protect)) {
    resident.erase(victim);
    ++stats.evictions;
  }
  if (cache->resident(key) && !resident.count(key)) {
    try {
      resident[key] = open(g, provider_options);
    } catch (...) {
      resident.erase(key);
      cache->forget(key);  // the books follow what really loaded
      throw;
    }
  }
  stats.peak_expert_bytes = std::max(stats.peak_expert_bytes, cache->peak());
}

Ort::Value Runner::Impl::moe(const LayerSpec& layer, Values& v) {
  const MoeSpec& spec = *layer.moe;
  const std::string where = layer.stage ? layer.stage->file : "layers[" + std::to_string(layer.index) + "]";
  Ort::Value& x = need(v, "moe_input", where);
  const auto xshape = float_shape(x, where + " moe_input");
  if (xshape.size() != 2) throw Error(where + ": moe_input must be (tokens, hidden)");
  const int64_t tokens = xshape[0], hidden = xshape[1];
  const float* xdata = x.GetTensorData<float>();
  Ort::Value& logits = need(v, "router_logits", where);
  if (float_shape(logits, where + " router_logits") != std::vector<int64_t>{tokens, spec.num_experts})
    throw Error(where + ": router_logits must be (tokens, " + std::to_string(spec.num_experts) + ")");
  std::vector<int64_t> chosen;
  std::vector<float> weights;
  route(logits.GetTensorData<float>(), tokens, spec.num_experts, spec.gating, &chosen, &weights);
  const int k = spec.gating.top_k;
  std::vector<float> routed(static_cast<size_t>(tokens * hidden), 0.0f);
  std::vector<std::vector<std::pair<int64_t, int>>> routed_to(static_cast<size_t>(spec.num_experts));
  for (int64_t t = 0; t < tokens; ++t)  // (token, slot) per expert, tokens ascending
    for (int s = 0; s < k; ++s) routed_to[static_cast<size_t>(chosen[t * k + s])].emplace_back(t, s);
  std::set<Key> protect;  // this layer's chosen experts: no admission of this layer evicts one
  for (int e = 0; e < spec.num_experts; ++e)
    if (!routed_to[static_cast<size_t>(e)].empty()) protect.emplace(layer.index, e);
  for (int e = 0; e < spec.num_experts; ++e) {
    const auto& rows = routed_to[static_cast<size_t>(e)];
    if (rows.empty()) continue;
    const Key key{layer.index, e};
    const GraphSpec& g = spec.experts[static_cast<size_t>(e)];
    Ort::Value in = tensor<float>({static_cast<int64_t>(rows.size()), hidden});
    float* dst = in.GetTensorMutableData<float>();
    for (size_t r = 0; r < rows.size(); ++r)
      std::copy_n(xdata + rows[r].first * hidden, hidden, dst + static_cast<int64_t>(r) * hidden);
    Values feed;
    feed.emplace(first(g.inputs, g, "inputs").name, std::move(in));
    bool on_cpu = false;
    Ort::Session& session = expert_session(key, g, &on_cpu);
    ++stats.expert_runs;
    auto out = run(session, g, feed);
    if (on_cpu) after_miss(key, g, protect);
    first(g.outputs, g, "outputs");
    if (float_shape(out.at(0), g.file + " output") != std::vector<int64_t>{static_cast<int64_t>(rows.size()), hidden})
      throw Error(g.file + ": the expert output must be (routed tokens, hidden)");
    const float* y = out.at(0).GetTensorData<float>();
    for (size_t r = 0; r < rows.size(); ++r) {
      const auto [t, s] = rows[r];
      const float w = weights[t * k + s];
      float* acc = routed.data() + t * hidden;
      const float* yr = y + static_cast<int64_t>(r) * hidden;
      for (int64_t j = 0; j < hidden; ++j) acc[j] += yr[j] * w;
    }
  }
  const auto count = static_cast<int64_t>(routed.size());
  if (spec.gating.shared_expert) {
    Ort::Value& shared_output = need(v, "shared_output", where);
    if (numel(float_shape(shared_output, where + " shared_output")) != count)
      throw Error(where + ": shared_output must hold tokens x hidden values");
    const float* shared = shared_output.GetTensorData<float>();
    for (size_t j = 0; j < routed.size(); ++j) routed[j] = routed[j] + shared[j];
  }
  Ort::Value& residual = need(v, "residual", where);
  const auto shape = float_shape(residual, where + " residual");
  if (numel(shape) != count) throw Error(where + ": residual must hold tokens x hidden values");
  Ort::Value hidden_states = tensor<float>(shape);
  const float* res = residual.GetTensorData<float>();
  float* out = hidden_states.GetTensorMutableData<float>();
  for (size_t j = 0; j < routed.size(); ++j) out[j] = res[j] + routed[j];
  return hidden_states;
}

}  // namespace moedge
