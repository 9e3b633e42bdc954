// Runner: a bundle's stage and expert graphs in ONNX Runtime sessions, the manifest's gating rule, a KV
// cache, and an expert cache on the provider under a byte budget. Mirrors moedge.runtime.BundleRunner:
// same step inputs, same routing, experts combined in ascending index order, the head on the last
// position only, so both give the same bits. Both stage targets: tensorrt (the KV cache goes in as
// past_key_values.L.key|value and comes back grown as present.L.key|value) and ort-cpu (fused stages
// that update per-layer KV buffers in place, with GroupQueryAttention's lengths and cos/sin tables).
// This file: construction, the KV cache, one forward step and the public Runner (sessions.cc opens and
// runs graphs; moe_layer.cc computes an MoE layer).
#include <algorithm>
#include <chrono>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "runner_internal.h"

namespace moedge {

using namespace detail;

Runner::Impl::Impl(const std::string& bundle, RunnerOptions options) : dir(bundle), opt(std::move(options)) {
  m = read_manifest(dir, opt.verify);
  in_place = m.stage_target == "ort-cpu";
  if (in_place) {
    rotary = read_rotary(dir, m.rotary, m.head_dim);
  } else {
    for (size_t i = 0; i < m.layers.size(); ++i) {
      const std::string idx = std::to_string(m.layers[i].index);
      present_slot["present." + idx + ".key"] = 2 * i;
      present_slot["present." + idx + ".value"] = 2 * i + 1;
    }
  }
  if (m.experts_in_graph() && (opt.expert_budget || !opt.plan.empty() || opt.provider != Provider::Cpu))
    throw Error(std::string(opt.provider != Provider::Cpu ? "experts on --provider " + std::string(provider_name(opt.provider))
                                                          : std::string("an expert cache (--gpu-budget, --plan)")) +
                " needs each expert as its own graph, but " + printable(dir) +
                " runs its experts inside its stage graphs (moedge split --experts-in-graph): use --provider cpu "
                "without a cache, or a bundle split without --experts-in-graph");
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
  // An ort-cpu bundle's stages are built for ONNX Runtime's CPU kernels and its KV buffers live on the CPU.
  for (const GraphSpec* g : stage_graphs()) stages[g->file] = open(*g, in_place ? cpu_options : provider_options);
  reset();
}

std::vector<const GraphSpec*> Runner::Impl::stage_graphs() const {
  std::vector<const GraphSpec*> out{&m.embedding};
  for (const auto& layer : m.layers)
    if (layer.stage) out.push_back(&*layer.stage);
  out.push_back(&m.head);
  return out;
}

const GraphSpec& Runner::Impl::expert_graph(const Key& key) const {
  for (const auto& layer : m.layers)
    if (layer.index == key.first && layer.moe && !layer.moe->experts_in_graph && key.second >= 0 &&
        key.second < layer.moe->num_experts)
      return layer.moe->experts[static_cast<size_t>(key.second)];
  throw Error("expert (" + std::to_string(key.first) + ", " + std::to_string(key.second) +
              ") is not in this bundle: the plan was written for another model");
}

void Runner::Impl::reset() {
  past.clear();
  capacity = 0;
  if (!in_place)
    for (size_t i = 0; i < m.layers.size(); ++i)
      for (int kv = 0; kv < 2; ++kv) past.push_back(tensor<float>({1, m.num_kv_heads, 0, m.head_dim}));
  cached = 0;
}

void Runner::Impl::reserve(int64_t positions) {
  if (!past.empty() && positions <= capacity) return;
  int64_t grown = past.empty() ? std::max(kMinCapacity, kCapacityStep * ((positions + kDecodeRoom + kCapacityStep - 1) /
                                                                         kCapacityStep))
                              : std::max(positions, 2 * capacity);
  if (!past.empty() && m.context > 0) grown = std::min(grown, m.context);  // step() refused more than the context
  const int64_t heads = m.num_kv_heads, dim = m.head_dim;
  int64_t count = 0;
  if (__builtin_mul_overflow(heads * dim, grown, &count) || count > (int64_t{1} << 40))
    throw Error("a KV cache of " + std::to_string(grown) + " positions is too large: shorten the prompt");
  std::vector<Ort::Value> buffers;
  for (size_t i = 0; i < 2 * m.layers.size(); ++i) {
    Ort::Value buffer = tensor<float>({1, heads, grown, dim});
    float* to = buffer.GetTensorMutableData<float>();
    std::memset(to, 0, static_cast<size_t>(count) * sizeof(float));
    if (!past.empty()) {  // each head's first `capacity` positions, as they were
      const float* from = past[i].GetTensorData<float>();
      const auto row = static_cast<size_t>(capacity * dim) * sizeof(float);
      for (int64_t h = 0; h < heads; ++h) std::memcpy(to + h * grown * dim, from + h * capacity * dim, row);
    }
    buffers.push_back(std::move(buffer));
  }
  past = std::move(buffers);
  capacity = grown;
}

void Runner::Impl::static_inputs(Values& v, int64_t seq) {
  const int64_t total = cached + seq;
  if (total > rotary.positions)
    throw Error(std::to_string(total) + " tokens exceed the " + std::to_string(rotary.positions) +
                " positions of the bundle's rotary tables: shorten the prompt or generate fewer tokens");
  Ort::Value seqlens = tensor<int32_t>({1});
  *seqlens.GetTensorMutableData<int32_t>() = static_cast<int32_t>(total - 1);  // below 2^31: the tables' bound
  const int64_t scalar_shape[1] = {0};  // not read: a scalar has no dimensions
  Ort::Value total_length = Ort::Value::CreateTensor<int32_t>(alloc, scalar_shape, 0);
  *total_length.GetTensorMutableData<int32_t>() = static_cast<int32_t>(total);
  v.emplace("seqlens_k", std::move(seqlens));
  v.emplace("total_sequence_length", std::move(total_length));
  const auto cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  const int64_t table_shape[2] = {rotary.positions, rotary.half};
  const auto table_size = static_cast<size_t>(rotary.positions * rotary.half);
  v.emplace("cos_cache", Ort::Value::CreateTensor<float>(cpu, rotary.cos.data(), table_size, table_shape, 2));
  v.emplace("sin_cache", Ort::Value::CreateTensor<float>(cpu, rotary.sin.data(), table_size, table_shape, 2));
  for (const auto& t : m.embedding.inputs)  // an embedding that lists a past reads its shape, never its values
    if (t.name.rfind("past_key_values.", 0) == 0 && !v.count(t.name)) {
      Ort::Value zeros = tensor<float>({1, m.num_kv_heads, cached, m.head_dim});
      std::fill_n(zeros.GetTensorMutableData<float>(), m.num_kv_heads * cached * m.head_dim, 0.0f);
      v.emplace(t.name, std::move(zeros));
    }
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
  std::vector<Ort::Value> present;  // tensorrt: the grown cache, by present_slot
  for (size_t i = 0; i < present_slot.size(); ++i) present.emplace_back(nullptr);
  try {  // a failed step consumed (tensorrt) or half-wrote (ort-cpu) the cache: the sequence starts over
    if (in_place) {
      reserve(cached + seq);
      static_inputs(v, seq);
    } else {
      for (size_t i = 0; i < m.layers.size(); ++i) {
        const std::string idx = std::to_string(m.layers[i].index);
        v.emplace("past_key_values." + idx + ".key", std::move(past[2 * i]));
        v.emplace("past_key_values." + idx + ".value", std::move(past[2 * i + 1]));
      }
    }
    auto merge = [&](const GraphSpec& g, std::vector<Ort::Value>&& outs) {
      for (size_t o = 0; o < outs.size(); ++o) {
        const std::string& name = g.outputs[o].name;
        if (!outs[o]) continue;  // updated in place
        if (auto slot = present_slot.find(name); slot != present_slot.end()) {
          present[slot->second] = std::move(outs[o]);
        } else {
          v.insert_or_assign(name, std::move(outs[o]));
        }
      }
    };
    merge(m.embedding, run(*stages.at(m.embedding.file), m.embedding, v));
    for (size_t i = 0; i < m.layers.size(); ++i) {
      if (!m.layers[i].stage) continue;  // run by an earlier layer's stage (parse_manifest checked the spans)
      const GraphSpec& g = *m.layers[i].stage;
      const size_t end = i + static_cast<size_t>(m.layers[i].span);  // the layers this stage runs: [i, end)
      if (in_place) {
        std::vector<InPlace> buffers;
        for (size_t j = i; j < end; ++j) {
          const std::string idx = std::to_string(m.layers[j].index);
          buffers.push_back({"past_key." + idx, "present_key." + idx, &past[2 * j]});
          buffers.push_back({"past_value." + idx, "present_value." + idx, &past[2 * j + 1]});
        }
        merge(g, run_in_place(*stages.at(g.file), g, v, buffers));
      } else {
        merge(g, run(*stages.at(g.file), g, v));
      }
      const LayerSpec& last = m.layers[end - 1];
      if (last.moe && !last.moe->experts_in_graph) {
        v.insert_or_assign("hidden_states", moe(last, v));
      } else {
        v.insert_or_assign("hidden_states", std::move(need(v, "hidden_states_out", g.file)));
      }
    }
    // The head on the last position only, as BundleRunner.forward(..., last_only=True) runs it.
    Ort::Value& hidden = need(v, "hidden_states", m.embedding.file);
    const auto hshape = float_shape(hidden, "the hidden state before the head");
    if (hshape.size() != 3 || hshape[0] != 1 || hshape[1] < 1)
      throw Error("the hidden state before the head must be (1, tokens, hidden): " + std::string(kResplit));
    Ort::Value last_row = tensor<float>({1, 1, hshape[2]});
    std::copy_n(hidden.GetTensorData<float>() + (hshape[1] - 1) * hshape[2], hshape[2],
                last_row.GetTensorMutableData<float>());
    v.insert_or_assign("hidden_states", std::move(last_row));
    first(m.head.outputs, m.head, "outputs");
    auto logits = run(*stages.at(m.head.file), m.head, v);
    const auto shape = float_shape(logits.at(0), m.head.file + " logits");
    const int64_t vocab = shape.empty() ? 0 : shape.back();
    if (vocab <= 0) throw Error(m.head.file + ": logits have no vocabulary axis");
    const float* data = logits.at(0).GetTensorData<float>() + (numel(shape) / vocab - 1) * vocab;  // last position
    for (const auto& [name, slot] : present_slot)
      if (!present[slot]) throw Error("no stage of the bundle outputs " + name + ": the bundle is incomplete");
    if (!in_place) past = std::move(present);
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
    if (layer.moe && !layer.moe->experts_in_graph)
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
