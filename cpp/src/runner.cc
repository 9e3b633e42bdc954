// Runner: a bundle's stage and expert graphs in ONNX Runtime sessions, the manifest's gating rule, a KV
// cache, and an expert cache on the provider under a byte budget. Mirrors moedge.runtime.BundleRunner:
// same step inputs, same routing, experts combined in ascending index order, so both give the same bits.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "moedge/runtime.h"
#include "onnxruntime_cxx_api.h"

namespace moedge {

// ---------------------------------------------------------------- gating

void route(const float* logits, int64_t tokens, int num_experts, const GatingRule& rule, std::vector<int64_t>* chosen,
           std::vector<float>* weights) {
  if (rule.scoring != "softmax") throw Error("gating scoring '" + rule.scoring + "' is not supported by moedge_rt");
  const int k = rule.top_k;
  if (k < 1 || k > num_experts) throw Error("gating top_k " + std::to_string(k) + " is outside [1, experts]");
  chosen->assign(static_cast<size_t>(tokens * k), 0);
  weights->assign(static_cast<size_t>(tokens * k), 0.0f);
  std::vector<double> probs(static_cast<size_t>(num_experts));
  std::vector<int> order(static_cast<size_t>(num_experts));
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = logits + t * num_experts;
    double top = static_cast<double>(row[0]);
    for (int e = 1; e < num_experts; ++e) top = std::max(top, static_cast<double>(row[e]));
    double sum = 0.0;
    for (int e = 0; e < num_experts; ++e) sum += probs[e] = std::exp(static_cast<double>(row[e]) - top);
    for (int e = 0; e < num_experts; ++e) probs[e] /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return probs[a] > probs[b]; });
    double chosen_sum = 0.0;
    for (int s = 0; s < k; ++s) chosen_sum += probs[order[s]];
    for (int s = 0; s < k; ++s) {
      const double w = rule.normalize_top_k ? probs[order[s]] / chosen_sum : probs[order[s]];
      (*chosen)[t * k + s] = order[s];
      (*weights)[t * k + s] = static_cast<float>(w);
    }
  }
}

// ---------------------------------------------------------------- expert cache

ExpertCache::ExpertCache(int64_t budget_bytes, bool admit_on_miss) : budget_(budget_bytes), admit_on_miss_(admit_on_miss) {}

void ExpertCache::pin(const Key& key, int64_t bytes) {
  if (pinned_.count(key)) return;
  if (auto it = where_.find(key); it != where_.end()) {  // admitted earlier: now it stays
    lru_.erase(it->second);
    where_.erase(it);
    pinned_.insert(key);
    pinned_bytes_ += bytes_[key];
    return;
  }
  if (bytes > budget_ - used_)  // budget_ - used_ >= 0: no sum that could overflow
    throw Error("the placement plan needs more than the expert budget of " + std::to_string(budget_) +
                " bytes: raise --gpu-budget or write the plan for this budget");
  pinned_.insert(key);
  pinned_bytes_ += bytes;
  bytes_[key] = bytes;
  used_ += bytes;
  peak_ = std::max(peak_, used_);
}

bool ExpertCache::lookup(const Key& key) {
  if (!resident(key)) return false;
  if (auto it = where_.find(key); it != where_.end()) lru_.splice(lru_.end(), lru_, it->second);
  return true;
}

std::vector<ExpertCache::Key> ExpertCache::admit(const Key& key, int64_t bytes) {
  std::vector<Key> evicted;
  if (!admit_on_miss_ || resident(key)) return evicted;
  if (bytes > budget_ - pinned_bytes_) return evicted;  // never fits beside the pinned set
  while (bytes > budget_ - used_) {
    const Key victim = lru_.front();
    lru_.pop_front();
    where_.erase(victim);
    used_ -= bytes_[victim];
    bytes_.erase(victim);
    evicted.push_back(victim);
  }
  lru_.push_back(key);
  where_[key] = std::prev(lru_.end());
  bytes_[key] = bytes;
  used_ += bytes;
  peak_ = std::max(peak_, used_);
  return evicted;
}

void ExpertCache::forget(const Key& key) {
  if (pinned_.count(key) || !resident(key)) return;
  if (auto it = where_.find(key); it != where_.end()) {
    lru_.erase(it->second);
    where_.erase(it);
  }
  used_ -= bytes_[key];
  bytes_.erase(key);
}

// ---------------------------------------------------------------- runner

namespace {

using Values = std::unordered_map<std::string, Ort::Value>;
using Key = ExpertCache::Key;

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// The shape of a float32 tensor; one clear error for anything else.
std::vector<int64_t> float_shape(const Ort::Value& value, const std::string& what) {
  if (!value.IsTensor()) throw Error(what + " is not a tensor");
  auto info = value.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw Error(what + " is not float32");
  return info.GetShape();
}

// The value named `name`, or an Error saying which graph should have output it.
Ort::Value& need(Values& values, const std::string& name, const std::string& graph) {
  const auto it = values.find(name);
  if (it == values.end())
    throw Error(graph + " does not output " + name + ", which moedge_rt needs: re-split the bundle with moedge split");
  return it->second;
}

// The first input or output of a graph, or an Error naming the graph.
const TensorSpec& first(const std::vector<TensorSpec>& specs, const GraphSpec& g, const char* what) {
  if (specs.empty()) throw Error(g.file + " has no " + what + " in manifest.json: re-split the bundle with moedge split");
  return specs.front();
}

// An ONNX Runtime exception's text without the C++ source location and function signature in front
// ("/src/x.cc:74 onnxruntime::F(const std::vector<...>&) [ONNXRuntimeError] : 1 : FAIL : y.cc:9 G what").
std::string ort_error_text(const char* what) {
  std::string text = what == nullptr ? "" : what;
  const std::string marker = "[ONNXRuntimeError] : ";
  if (const size_t at = text.rfind(marker); at != std::string::npos) {
    size_t start = at + marker.size();
    for (int separators = 0; separators < 2; ++separators) {  // the status code and its name
      const size_t next = text.find(" : ", start);
      if (next == std::string::npos) break;
      start = next + 3;
    }
    text = text.substr(start);
  }
  // "file.cc:123 " then the function: "Name " or "ns::Name(args) ".
  const size_t space = text.find(' ');
  const std::string token = text.substr(0, space);
  const size_t colon = token.rfind(':');
  const bool location = space != std::string::npos && colon != std::string::npos && colon + 1 < token.size() &&
                        token.find_first_not_of("0123456789", colon + 1) == std::string::npos &&
                        (token.find(".cc:") != std::string::npos || token.find(".h:") != std::string::npos ||
                         token.find(".cpp:") != std::string::npos);
  if (location) {
    size_t pos = space + 1;
    const size_t word_end = text.find_first_of(" (", pos);
    if (word_end != std::string::npos && text[word_end] == '(') {  // a signature: skip to its matching ')'
      int depth = 0;
      for (; pos < text.size(); ++pos) {
        if (text[pos] == '(') ++depth;
        if (text[pos] == ')' && --depth == 0) break;
      }
      pos = text.find(' ', pos);
    } else {
      pos = word_end;
    }
    if (pos != std::string::npos) text = text.substr(pos + 1);
  }
  std::replace(text.begin(), text.end(), '\n', ' ');
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

// ONNX Runtime's log on stderr, one line per message without C++ locations. A failure that also comes
// back as an exception ("Exception during initialization: ...") is left to the caller, which reports it.
void ORT_API_CALL log_to_stderr(void*, OrtLoggingLevel severity, const char*, const char*, const char*,
                                const char* message) {
  if (severity < ORT_LOGGING_LEVEL_WARNING || message == nullptr) return;
  const std::string text = message;
  if (text.rfind("Exception during initialization", 0) == 0) return;
  std::fprintf(stderr, "moedge_rt: onnxruntime %s: %s\n", severity == ORT_LOGGING_LEVEL_WARNING ? "warning" : "error",
               ort_error_text(text.c_str()).c_str());
}

bool has_provider(const std::string& name) {
  const auto providers = Ort::GetAvailableProviders();
  return std::find(providers.begin(), providers.end(), name) != providers.end();
}

}  // namespace

struct Runner::Impl {
  std::string dir;
  RunnerOptions opt;
  Manifest m;
  std::unique_ptr<Ort::Env> env;
  Ort::SessionOptions cpu_options;
  Ort::SessionOptions provider_options;
  Ort::AllocatorWithDefaultOptions alloc;
  std::map<std::string, std::unique_ptr<Ort::Session>> stages;  // by file, on the provider
  std::map<Key, std::unique_ptr<Ort::Session>> resident;        // experts on the provider
  std::map<Key, std::unique_ptr<Ort::Session>> cpu;             // experts run on the CPU (misses)
  std::optional<ExpertCache> cache;
  std::vector<Ort::Value> past;  // key and value of every layer
  std::unordered_map<std::string, size_t> present_slot;  // "present.<layer>.key|value" -> index in past
  int64_t cached = 0;
  RunStats stats;

  Impl(const std::string& bundle, RunnerOptions options) : dir(bundle), opt(std::move(options)) {
    m = read_manifest(dir, opt.verify);
    for (size_t i = 0; i < m.layers.size(); ++i) {
      const std::string idx = std::to_string(m.layers[i].index);
      present_slot["present." + idx + ".key"] = 2 * i;
      present_slot["present." + idx + ".value"] = 2 * i + 1;
    }
    if (opt.shared_thread_pool) {
      Ort::ThreadingOptions threading;
      threading.SetGlobalIntraOpNumThreads(opt.intra_op_threads);
      threading.SetGlobalInterOpNumThreads(1);
      env = std::make_unique<Ort::Env>(threading, log_to_stderr, nullptr, ORT_LOGGING_LEVEL_WARNING, "moedge_rt");
    } else {
      env = std::make_unique<Ort::Env>(ORT_LOGGING_LEVEL_WARNING, "moedge_rt", log_to_stderr, nullptr);
    }
    for (Ort::SessionOptions* so : {&cpu_options, &provider_options}) {
      if (opt.shared_thread_pool) {
        so->DisablePerSessionThreads();
      } else {
        if (opt.intra_op_threads > 0) so->SetIntraOpNumThreads(opt.intra_op_threads);
        so->AddConfigEntry("session.intra_op.allow_spinning", "0");  // hundreds of sessions share the cores
      }
      so->SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    }
    provider_options.AddConfigEntry("session.record_ep_graph_assignment_info", "1");  // for check_placement
    add_provider();
    if (opt.policy != "lru" && opt.policy != "static") throw Error("unknown policy '" + opt.policy + "': use lru or static");
    if (!opt.plan.empty() && opt.expert_budget < 0)
      throw Error("a placement plan needs an expert budget: set RunnerOptions::expert_budget (moedge-run --gpu-budget)");
    if (opt.expert_budget >= 0) {
      int64_t largest = 0;
      for (const auto& layer : m.layers)
        if (layer.moe)
          for (const auto& g : layer.moe->experts) largest = std::max(largest, g.bytes);
      if (opt.expert_budget > 0 && opt.expert_budget < largest)
        throw Error("the expert budget of " + std::to_string(opt.expert_budget) + " bytes is smaller than the largest expert (" +
                    std::to_string(largest) + " bytes): give at least that, or 0 to run every expert on the CPU");
      cache.emplace(opt.expert_budget, opt.policy == "lru");
      for (const Key& key : opt.plan) {
        const GraphSpec& g = expert_graph(key);
        cache->pin(key, g.bytes);
        resident[key] = open(g, provider_options);
      }
      stats.peak_expert_bytes = cache->peak();
    }
    for (const GraphSpec* g : stage_graphs()) stages[g->file] = open(*g, provider_options);
    reset();
  }

  void add_provider() {
    if (opt.provider == "cpu") return;
    if (opt.provider == "cuda" || opt.provider == "tensorrt") {
      const std::string ep = opt.provider == "cuda" ? "CUDAExecutionProvider" : "TensorrtExecutionProvider";
      if (!has_provider(ep))
        throw Error("this ONNX Runtime (" + onnxruntime_version() + ") has no " + ep +
                    ": point --ort-lib at a GPU build of ONNX Runtime (onnxruntime-gpu) or use --provider cpu");
      const OrtApi& api = Ort::GetApi();
      if (opt.provider == "tensorrt") {
        OrtTensorRTProviderOptionsV2* trt = nullptr;
        Ort::ThrowOnError(api.CreateTensorRTProviderOptions(&trt));
        provider_options.AppendExecutionProvider_TensorRT_V2(*trt);
        api.ReleaseTensorRTProviderOptions(trt);
      }
      OrtCUDAProviderOptionsV2* cuda = nullptr;
      Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
      provider_options.AppendExecutionProvider_CUDA_V2(*cuda);
      api.ReleaseCUDAProviderOptions(cuda);
      return;
    }
    throw Error("unknown provider '" + opt.provider + "': use cpu, cuda or tensorrt");
  }

  std::vector<const GraphSpec*> stage_graphs() const {
    std::vector<const GraphSpec*> out{&m.embedding};
    for (const auto& layer : m.layers) out.push_back(&layer.stage);
    out.push_back(&m.head);
    return out;
  }

  const GraphSpec& expert_graph(const Key& key) const {
    for (const auto& layer : m.layers)
      if (layer.index == key.first && layer.moe && key.second >= 0 && key.second < layer.moe->num_experts)
        return layer.moe->experts[static_cast<size_t>(key.second)];
    throw Error("expert (" + std::to_string(key.first) + ", " + std::to_string(key.second) +
                ") is not in this bundle: the plan was written for another model");
  }

  std::unique_ptr<Ort::Session> open(const GraphSpec& g, const Ort::SessionOptions& so) {
    const std::string path = dir + "/" + g.file;
    std::unique_ptr<Ort::Session> session;
    try {
      session = std::make_unique<Ort::Session>(*env, path.c_str(), so);
      if (&so == &provider_options) check_placement(*session, g);
    } catch (const Ort::Exception& e) {
      throw Error("ONNX Runtime cannot load " + path + ": " + ort_error_text(e.what()));
    }
    return session;
  }

  // The asked provider's EP must hold nodes of every graph opened on it. The C API has no silent fallback
  // (a CUDA or TensorRT EP that cannot start fails AppendExecutionProvider_*_V2 or session creation, and
  // Ort:: throws), but ORT's partitioner gives the CPU EP every node the asked EP has no kernel for,
  // possibly all of them. What this proves: ORT assigned nodes of the graph to that EP, whose kernels run
  // on the device. Not proven: how much of the graph that is (the count is in the error only).
  // Session_GetEpGraphAssignmentInfo (API 24) is used because SessionGetEpDeviceForInputs answers only for
  // EPs registered as OrtEpDevice (SessionOptionsAppendExecutionProvider_V2), not through the *_V2 options.
  void check_placement(const Ort::Session& session, const GraphSpec& g) const {
    const std::string ep = opt.provider == "cuda"       ? "CUDAExecutionProvider"
                           : opt.provider == "tensorrt" ? "TensorrtExecutionProvider"
                                                        : "CPUExecutionProvider";
    std::map<std::string, size_t> nodes;
    size_t total = 0;
    for (const auto& subgraph : session.GetEpGraphAssignmentInfo()) {
      const size_t n = subgraph.GetNodes().size();
      nodes[subgraph.GetEpName()] += n;
      total += n;
    }
    if (total == 0 || nodes.count(ep) > 0) return;
    std::string where;
    for (const auto& [name, n] : nodes) where += (where.empty() ? "" : ", ") + name + ": " + std::to_string(n);
    throw Error(g.file + ": ONNX Runtime assigned none of its " + std::to_string(total) + " nodes to " + ep + " (" +
                where + "): the provider would do nothing for this graph; check ONNX Runtime's warnings above");
  }

  // Run `g` with inputs taken from `values` by name; returns its outputs in graph order.
  std::vector<Ort::Value> run(Ort::Session& session, const GraphSpec& g, Values& values) {
    std::vector<const char*> in_names, out_names;
    std::vector<const OrtValue*> inputs;
    for (const auto& t : g.inputs) {
      auto it = values.find(t.name);
      if (it == values.end()) throw Error(g.file + " needs input " + t.name + ", which no earlier stage provides");
      in_names.push_back(t.name.c_str());
      inputs.push_back(it->second);
    }
    for (const auto& t : g.outputs) out_names.push_back(t.name.c_str());
    std::vector<OrtValue*> raw(out_names.size(), nullptr);
    Ort::ThrowOnError(Ort::GetApi().Run(session, nullptr, in_names.data(), inputs.data(), inputs.size(),
                                        out_names.data(), out_names.size(), raw.data()));
    std::vector<Ort::Value> outs;
    for (OrtValue* v : raw) outs.emplace_back(v);
    return outs;
  }

  template <typename T>
  Ort::Value tensor(const std::vector<int64_t>& shape) {
    return Ort::Value::CreateTensor<T>(alloc, shape.data(), shape.size());
  }

  void reset() {
    past.clear();
    for (size_t i = 0; i < m.layers.size(); ++i)
      for (int kv = 0; kv < 2; ++kv) past.push_back(tensor<float>({1, m.num_kv_heads, 0, m.head_dim}));
    cached = 0;
  }

  Ort::Session& expert_session(const Key& key, const GraphSpec& g, bool* on_cpu) {
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

  void after_miss(const Key& key, const GraphSpec& g) {
    for (const Key& victim : cache->admit(key, g.bytes)) {
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

  // residual + sum over chosen experts of weight * expert(x) [+ shared output], experts in index order.
  Ort::Value moe(const LayerSpec& layer, Values& v) {
    const MoeSpec& spec = *layer.moe;
    const std::string where = layer.stage.file;
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
      if (on_cpu) after_miss(key, g);
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

  std::vector<float> step(const std::vector<int64_t>& ids) {
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
};

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
