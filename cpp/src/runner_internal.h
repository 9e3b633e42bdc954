// Internal to moedge_rt: Runner::Impl, split by idea over sessions.cc (ONNX Runtime environment, session
// options, providers, opening and running graphs), moe_layer.cc (the expert cache and the MoE layer) and
// runner.cc (construction, the KV cache, one step, the public Runner). Not installed.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "bundle_internal.h"
#include "expert_cache.h"
#include "moedge/runtime.h"
#include "onnxruntime_cxx_api.h"

namespace moedge {
namespace detail {

using Values = std::unordered_map<std::string, Ort::Value>;
using Key = ExpertCache::Key;

// A graph input and output bound to the same value, which the graph updates in place (an ort-cpu
// stage's KV buffer: past_key.L and present_key.L).
struct InPlace {
  std::string input;
  std::string output;
  Ort::Value* value;
};

constexpr int64_t kMinCapacity = 256;  // an ort-cpu KV buffer's first capacity, at least
constexpr int64_t kCapacityStep = 64;  // the first capacity is a multiple of this
constexpr int64_t kDecodeRoom = 64;    // positions the first allocation leaves beyond the first step

// ---- sessions.cc

// An ONNX Runtime exception's text without the C++ source location and function signature in front
// ("/src/x.cc:74 onnxruntime::F(const std::vector<...>&) [ONNXRuntimeError] : 1 : FAIL : y.cc:9 G what").
std::string ort_error_text(const char* what);
// The process's one Ort::Env: made by the first caller, shared by every caller while one holds it,
// released with the last holder; an Error when the live one has other thread pools.
std::shared_ptr<Ort::Env> shared_env(bool shared_thread_pool, int intra_op_threads);

// ---- moe_layer.cc: checked access to graph values

int64_t numel(const std::vector<int64_t>& shape);
// The shape of a float32 tensor; one clear error for anything else.
std::vector<int64_t> float_shape(const Ort::Value& value, const std::string& what);
// The value named `name`, or an Error saying which graph should have output it.
Ort::Value& need(Values& values, const std::string& name, const std::string& graph);
// The first input or output of a graph, or an Error naming the graph.
const TensorSpec& first(const std::vector<TensorSpec>& specs, const GraphSpec& g, const char* what);

}  // namespace detail

struct Runner::Impl {
  using Key = detail::Key;
  using Values = detail::Values;

  std::string dir;
  RunnerOptions opt;
  Manifest m;
  std::shared_ptr<Ort::Env> env;  // declared before every session: released after them
  Ort::SessionOptions cpu_options;
  Ort::SessionOptions provider_options;
  Ort::AllocatorWithDefaultOptions alloc;
  std::map<std::string, std::unique_ptr<Ort::Session>> stages;  // by file, on the provider
  std::map<Key, std::unique_ptr<Ort::Session>> resident;        // experts on the provider
  std::map<Key, std::unique_ptr<Ort::Session>> cpu;             // experts run on the CPU (misses)
  std::optional<detail::ExpertCache> cache;
  // Key and value of every layer (2i, 2i + 1). tensorrt target: (1, kv_heads, cached, head_dim), replaced
  // each step. ort-cpu target: (1, kv_heads, capacity, head_dim), updated in place; none before a step.
  std::vector<Ort::Value> past;
  std::unordered_map<std::string, size_t> present_slot;  // tensorrt: "present.<layer>.key|value" -> index in past
  bool in_place = false;                                  // the ort-cpu target
  int64_t capacity = 0;                                   // ort-cpu: positions each buffer holds
  detail::RotaryTables rotary;                            // ort-cpu: the cos/sin tables
  int64_t cached = 0;
  RunStats stats;

  // runner.cc
  Impl(const std::string& bundle, RunnerOptions options);
  std::vector<const GraphSpec*> stage_graphs() const;
  const GraphSpec& expert_graph(const Key& key) const;
  void reset();
  std::vector<float> step(const std::vector<int64_t>& ids);
  // ort-cpu: room for `positions` per buffer (the first step allocates positions + kDecodeRoom rounded up
  // to a multiple of kCapacityStep, at least kMinCapacity; then doubling, at most the context), as
  // moedge.runtime.static_cache.
  void reserve(int64_t positions);
  // ort-cpu: what the embedding and the fused stages read besides the hidden state and the KV buffers.
  void static_inputs(Values& v, int64_t seq);

  // sessions.cc
  void configure_sessions();  // env, both SessionOptions, the provider
  void add_provider();
  std::unique_ptr<Ort::Session> open(const GraphSpec& g, const Ort::SessionOptions& so);
  void check_placement(const Ort::Session& session, const GraphSpec& g) const;
  // Run `g` with inputs taken from `values` by name; returns its outputs in graph order.
  std::vector<Ort::Value> run(Ort::Session& session, const GraphSpec& g, Values& values);
  // The same through an I/O binding with each `in_place` value bound as its input and its output; the
  // other outputs land on the CPU. Returns the outputs in graph order, empty for the in-place ones.
  std::vector<Ort::Value> run_in_place(Ort::Session& session, const GraphSpec& g, Values& values,
                                       const std::vector<detail::InPlace>& in_place);

  // moe_layer.cc
  Ort::Session& expert_session(const Key& key, const GraphSpec& g, bool* on_cpu);
  // Offer a missed expert to the cache after its CPU run; `protect`: the layer's chosen experts.
  void after_miss(const Key& key, const GraphSpec& g, const std::set<Key>& protect);
  // residual + sum over chosen experts of weight * expert(x) [+ shared output], experts in index order.
  Ort::Value moe(const LayerSpec& layer, Values& v);

  template <typename T>
  Ort::Value tensor(const std::vector<int64_t>& shape) {
    return Ort::Value::CreateTensor<T>(alloc, shape.data(), shape.size());
  }
};

}  // namespace moedge
