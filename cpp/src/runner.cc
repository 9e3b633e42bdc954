// Runner: a bundle's stage and expert graphs in ONNX Runtime sessions, the manifest's gating rule, a KV
// cache, and an expert cache on the provider under a byte budget. Mirrors moedge.runtime.BundleRunner:
// same step inputs, same routing, experts combined in ascending index order, so both give the same bits.
// This file: construction, the KV cache, one forward step and the public Runner (sessions.cc opens and
// runs graphs; moe_layer.cc computes an MoE layer).
#include <algorithm>
#include <chrono>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "runner_internal.h"

namespace moedge {

using namespace detail;

Runner::Impl::Impl(const std::string& bundle, RunnerOptions options) : dir(bundle), opt(std::move(options)) {
  m = read_manifest(dir, opt.verify);
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const std::string idx = std::to_string(m.layers[i].index);
    present_slot["present." + idx + ".key"] = 2 * i;
    present_slot["present." + idx + ".value"] = 2 * i + 1;
  }
  configure_sessions();
  if (opt.policy != CachePolicy::Lru && opt.policy != CachePolicy::Pinned)
    throw Error("unknown cache policy " + std::to_string(static_cast<int>(opt.policy)) + ": use lru or pinned");
  if (!opt.plan.empty() && !opt.expert_budget)
    throw Error("a placement plan needs an expert budget: set RunnerOptions::expert_budget (moedge-run --gpu-budget)");
  if (opt.expert_budget) {
    size_t moe_layers = 0;
    std::vector<int64_t> expert_bytes;
    for (const auto& layer : m.layers)
      if (layer.moe) {
        ++moe_layers;
        for (const auto& g : layer.moe->experts) expert_bytes.push_back(g.bytes);
      }
    cache.emplace(make_expert_cache(*opt.expert_budget, opt.policy, moe_layers, expert_bytes));
    for (const Key& key : opt.plan) {
      const GraphSpec& g = expert_graph(key);
      cache->pin(key, g.bytes);
      resident[key] = open(g, provider_options);
    }
    stats.peak_expert_bytes = cache->peak();
    stats.per_layer_slots = cache->per_layer_slots();
  }
  for (const GraphSpec* g : stage_graphs()) stages[g->file] = open(*g, provider_options);
  reset();
}

std::vector<const GraphSpec*> Runner::Impl::stage_graphs() const {
  std::vector<const GraphSpec*> out{&m.embedding};
  for (const auto& layer : m.layers) out.push_back(&layer.stage);
  out.push_back(&m.head);
  return out;
}

const GraphSpec& Runner::Impl::expert_graph(const Key& key) const {
  for (const auto& layer : m.layers)
    if (layer.index == key.first && layer.moe && key.second >= 0 && key.second < layer.moe->num_experts)
      return layer.moe->experts[static_cast<size_t>(key.second)];
  throw Error("expert (" + std::to_string(key.first) + ", " + std::to_string(key.second) +
              ") is not in this bundle: the plan was written for another model");
}

void Runner::Impl::reset() {
  past.clear();
  for (size_t i = 0; i < m.layers.size(); ++i)
    for (int kv = 0; kv < 2; ++kv) past.push_back(tensor<float>({1, m.num_kv_heads, 0, m.head_dim}));
  cached = 0;
}

std::vector<float> Runner::Impl::step(const std::vector<int64_t>& ids) {
  if (ids.empty()) throw Error("a step needs at least one token id");
  for (int64_t id : ids)
    if (id < 0 || (m.vocab_size > 0 && id >= m.vocab_size))
      throw Error("token id " + std::to_string(id) + " is out of range: ids must lie in [0, " +
                  std::to_string(m.vocab_size) + ")");
  const auto seq = static_cast<int64_t>(ids.size());
  if (m.context > 0 && cached + seq > m.context)
    throw Error(std::to_string(cached + seq) + " tokens exceed the model's context of " + std::to_string(m.context) +
                ": shorten the prompt or generate fewer tokens");
  Values v;
  Ort::Value input_ids = tensor<int64_t>({1, seq});
  std::copy(ids.begin(), ids.end(), input_ids.GetTensorMutableData<int64_t>());
  Ort::Value mask = tensor<int64_t>({1, cached + seq});
  std::fill_n(mask.GetTensorMutableData<int64_t>(), cached + seq, int64_t{1});
  Ort::Value positions = tensor<int64_t>({1, seq});
  std::iota(positions.GetTensorMutableData<int64_t>(), positions.GetTensorMutableData<int64_t>() + seq, cached);
  v.emplace("input_ids", std::move(input_ids));
  v.emplace("attention_mask", std::move(mask));
  v.emplace("position_ids", std::move(positions));
  std::vector<Ort::Value> present;
  for (size_t i = 0; i < 2 * m.layers.size(); ++i) present.emplace_back(nullptr);
  try {  // a failed step consumed the cache: the sequence starts over (reset)
    for (size_t i = 0; i < m.layers.size(); ++i) {
      const std::string idx = std::to_string(m.layers[i].index);
      v.emplace("past_key_values." + idx + ".key", std::move(past[2 * i]));
      v.emplace("past_key_values." + idx + ".value", std::move(past[2 * i + 1]));
    }
    auto merge = [&](const GraphSpec& g, std::vector<Ort::Value>&& outs) {
      for (size_t o = 0; o < outs.size(); ++o) {
        const std::string& name = g.outputs[o].name;
        if (auto slot = present_slot.find(name); slot != present_slot.end()) {
          present[slot->second] = std::move(outs[o]);
        } else {
          v.insert_or_assign(name, std::move(outs[o]));
        }
      }
    };
    merge(m.embedding, run(*stages.at(m.embedding.file), m.embedding, v));
    for (const auto& layer : m.layers) {
      merge(layer.stage, run(*stages.at(layer.stage.file), layer.stage, v));
      if (layer.moe) {
        v.insert_or_assign("hidden_states", moe(layer, v));
      } else {
        v.insert_or_assign("hidden_states", std::move(need(v, "hidden_states_out", layer.stage.file)));
      }
    }
    first(m.head.outputs, m.head, "outputs");
    auto logits = run(*stages.at(m.head.file), m.head, v);
    const auto shape = float_shape(logits.at(0), m.head.file + " logits");
    const int64_t vocab = shape.empty() ? 0 : shape.back();
    if (vocab <= 0) throw Error(m.head.file + ": logits have no vocabulary axis");
    const float* data = logits.at(0).GetTensorData<float>() + (numel(shape) / vocab - 1) * vocab;  // last position
    for (const auto& [name, slot] : present_slot)
      if (!present[slot]) throw Error("no stage of the bundle outputs " + name + ": the bundle is incomplete");
    past = std::move(present);
    cached += seq;
    return std::vector<float>(data, data + vocab);
  } catch (const Ort::Exception& e) {
    reset();  // the cache was consumed by the failed step
    throw Error("ONNX Runtime failed: " + ort_error_text(e.what()));
  } catch (...) {
    reset();
    throw;
  }
}

namespace {
const std::string& require_onnxruntime(const std::string& bundle) {
  onnxruntime_version();  // throws a clear error when load_onnxruntime() was not called
  return bundle;
}
}  // namespace

Runner::Runner(const std::string& bundle_dir, RunnerOptions options) try
    : impl_(std::make_unique<Impl>(require_onnxruntime(bundle_dir), std::move(options))) {
} catch (const Ort::Exception& e) {
  throw Error("ONNX Runtime failed: " + ort_error_text(e.what()));
}
Runner::~Runner() = default;
Runner::Runner(Runner&&) noexcept = default;
Runner& Runner::operator=(Runner&&) noexcept = default;
const Manifest& Runner::manifest() const { return impl_->m; }
std::vector<float> Runner::step(const std::vector<int64_t>& ids) { return impl_->step(ids); }
void Runner::reset() { impl_->reset(); }
void Runner::preload() {
  if (impl_->cache) return;  // under a budget, residency is the cache's to decide
  for (const auto& layer : impl_->m.layers)
    if (layer.moe)
      for (int e = 0; e < layer.moe->num_experts; ++e) {
        auto& session = impl_->resident[{layer.index, e}];
        if (!session) session = impl_->open(layer.moe->experts[static_cast<size_t>(e)], impl_->provider_options);
      }
}
int64_t Runner::cached_tokens() const { return impl_->cached; }
const RunStats& Runner::stats() const { return impl_->stats; }

std::vector<int64_t> Runner::generate(const std::vector<int64_t>& prompt, int max_new_tokens,
                                      std::vector<float>* first_logits) {
  if (prompt.empty()) throw Error("generation needs at least one prompt token");
  const int64_t context = impl_->m.context;
  if (context > 0 && static_cast<int64_t>(prompt.size()) >= context)
    throw Error("the prompt has " + std::to_string(prompt.size()) + " tokens; the model's context is " +
                std::to_string(context) + ": shorten it");
  reset();
  if (max_new_tokens <= 0) return {};
  using Clock = std::chrono::steady_clock;
  RunStats& stats = impl_->stats;
  std::vector<int64_t> out;
  auto start = Clock::now();
  std::vector<float> logits = step(prompt);
  stats.prompt_seconds += std::chrono::duration<double>(Clock::now() - start).count();
  stats.prompt_tokens += static_cast<int64_t>(prompt.size());
  if (first_logits != nullptr) *first_logits = logits;
  for (int i = 0; i < max_new_tokens; ++i) {
    const auto token = static_cast<int64_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    out.push_back(token);
    const auto& eos = impl_->m.eos_token_id;
    if (eos && token == *eos) break;
    if (i + 1 == max_new_tokens) break;
    if (context > 0 && impl_->cached + 1 >= context) break;  // as moedge.runtime.Generator stops
    start = Clock::now();
    logits = step({token});
    stats.decode_seconds += std::chrono::duration<double>(Clock::now() - start).count();
    ++stats.decode_tokens;
  }
  return out;
}

}  // namespace moedge
