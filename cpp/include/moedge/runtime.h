// moedge_rt: run a moedge bundle (manifest.json, stage graphs, one graph per expert) from C++ through
// the ONNX Runtime C++ API. Routing and gating follow the manifest's rule exactly as the Python runtime
// (moedge.runtime) does, so both give the same tokens; experts can be cached on an accelerator under a
// byte budget (a per-layer LRU as the Python runtime's policy lru, or pinned by a plan file from
// `moedge profile --plan`).
//
// ONNX Runtime is loaded at run time (ORT_API_MANUAL_INIT + dlopen): call load_onnxruntime() before
// anything else. Any libonnxruntime >= 1.29 works, including a Jetson's own.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace moedge {

// Every failure the library reports: one message saying what is wrong and what to do.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

constexpr int kSchemaVersion = 2;  // the newest bundle schema this library reads (2: experts_in_graph)
// The largest byte count a manifest, a plan or --gpu-budget may give: any sum of two fits in int64.
constexpr int64_t kMaxBytes = int64_t{1} << 62;
// The largest manifest.json or plan file read (a real 61-layer x 256-expert manifest is a few MiB).
constexpr int64_t kMaxJsonBytes = int64_t{64} << 20;

struct TensorSpec {
  std::string name;
  std::string dtype;
};

struct GraphSpec {
  std::string file;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  int64_t bytes = 0;
};

// How an MoE layer turns router logits into expert choices and weights (moedge.formats.manifest.GatingRule).
struct GatingRule {
  std::string scoring;  // "softmax"
  int top_k = 0;
  bool normalize_top_k = false;
  bool shared_expert = false;
};

struct MoeSpec {
  int num_experts = 0;
  GatingRule gating;
  std::vector<GraphSpec> experts;
  std::string router;  // .npy of the router weight, relative to the bundle; empty when absent
  // The stage graph routes and runs the experts (moedge split --experts-in-graph): no expert graphs, no
  // router; the stage outputs hidden_states_out like a dense stage and may span several layers.
  bool experts_in_graph = false;
};

// One decoder layer. A stage may run `span` consecutive dense layers (an ort-cpu bundle joins them into
// one graph), or MoE layers whose experts run in-graph; the layers it covers have no stage of their own
// and no moe with separate experts (parse_manifest checks it).
struct LayerSpec {
  int index = 0;
  std::optional<GraphSpec> stage;  // empty: the layer runs inside an earlier layer's stage
  std::optional<MoeSpec> moe;
  int span = 1;  // layers the stage runs, from this one on
};

struct FileEntry {
  std::string sha256;
  int64_t bytes = 0;
};

struct Manifest {
  int schema_version = 0;
  std::string precision;
  std::string name;
  int num_kv_heads = 0;
  int head_dim = 0;
  int64_t vocab_size = 0;
  int64_t context = 0;  // max_position_embeddings when the bundle records it, else 0 (unknown)
  std::optional<int64_t> eos_token_id;
  GraphSpec embedding;
  std::vector<LayerSpec> layers;
  GraphSpec head;
  std::map<std::string, FileEntry> files;
  std::string tokenizer;  // relative to the bundle; empty when absent
  std::string routing;    // relative to the bundle; empty when absent
  // What the layer stages are built for: "tensorrt" (standard ONNX ops, the KV cache as inputs and
  // outputs) or "ort-cpu" (ONNX Runtime's GroupQueryAttention, the KV cache updated in place).
  std::string stage_target = "tensorrt";
  std::string rotary;  // ort-cpu: .npy of the cos/sin tables, relative to the bundle; empty when absent

  // Bytes of every routed expert, as stored; saturates at kMaxBytes.
  int64_t expert_bytes() const;
  // Whether some MoE layer runs its experts inside its stage graph (no per-expert graphs).
  bool experts_in_graph() const;
};

// Parse and check <bundle>/manifest.json (parse_manifest), then the files it lists (check_files; their
// sha256 only with verify). Every failure is an Error naming the file or manifest field.
Manifest read_manifest(const std::string& bundle_dir, bool verify = true);

// The manifest of the bundle at `bundle_dir` from the text of its manifest.json, checked before any
// bundle file is opened: types and ranges of every field this library reads; every path the manifest
// names (files keys, graph files, routers, tokenizer, routing, rotary) relative, normalised and, symlinks
// resolved, inside the bundle; each of them listed under files; no file used by two graphs. `where`
// names the manifest in messages. Opens nothing: only stats and resolves paths under `bundle_dir`.
Manifest parse_manifest(const std::string& text, const std::string& bundle_dir, const std::string& where);

// Check that every file the manifest lists is a regular file (stat: nothing else is opened) of its
// recorded size, that every graph's external data is a listed file, and, with `hashes`, that every
// file has its recorded sha256.
void check_files(const std::string& bundle_dir, const Manifest& manifest, bool hashes);

// Every external-data `location` the tensors of an ONNX model (its bytes) name, in file order; an Error
// when the bytes are not a well-formed ONNX protobuf. check_files requires each, taken relative to the
// graph's folder, to be a file listed under files.
std::vector<std::string> onnx_external_locations(const std::string& model);

// Hex sha256 of a regular file (anything else is an Error, and a FIFO is never waited on).
std::string sha256_file(const std::string& path);

// The experts a plan file (`moedge profile --plan`) pins, as (layer, expert).
std::vector<std::pair<int, int>> read_plan(const std::string& path);
// The same, each checked against `bundle`: the layer is an MoE layer, the expert one of its experts.
std::vector<std::pair<int, int>> read_plan(const std::string& path, const Manifest& bundle);

// Load libonnxruntime from `library_path` and bind the C++ API to it (once per process).
void load_onnxruntime(const std::string& library_path);
// Where to find libonnxruntime: $MOEDGE_ORT_LIB, else the SDK the build was configured with (when that
// file is gone, load_onnxruntime falls back to the loader's search path: libonnxruntime.so.1).
std::string default_onnxruntime_path();
// "1.32.0": the loaded library's version.
std::string onnxruntime_version();

// An expert budget as text, in the grammar of the Python runtime's --gpu-budget
// (moedge.inputs.parse_budget_spec, moedge.runtime.scheduler.parse_budget): bytes with a unit (b; KB, MB,
// GB = 10^3, 10^6, 10^9; KiB, MiB, GiB = 2^10, 2^20, 2^30; any case), N% of the bundle's expert bytes
// (0 to 100), or a bare number: a share of the expert bytes when it is at most 1, else bytes. Numbers
// are what Python's float() reads (1.5, 1e9, 1_000, surrounding spaces). `auto` (90% of the free device
// memory) is refused: only the Python runtime measures free memory. Each refusal is one Error line.
// tests/data/budget_grammar.json lists inputs both runtimes are tested against.
struct Budget {
  bool share = false;  // value is a fraction of the expert bytes; else bytes
  double value = 0.0;
  // Bytes for a bundle with `expert_bytes` of routed experts: truncated as Python's int(), at most
  // kMaxBytes (a larger budget holds every expert anyway).
  int64_t bytes(int64_t expert_bytes) const;
};
Budget parse_budget(const std::string& text);

// Where a Runner runs the stage graphs and the experts it keeps resident.
enum class Provider { Cpu, Cuda, TensorRt };
// "cpu", "cuda" or "tensorrt", as moedge-run's --provider names it.
const char* provider_name(Provider provider);

// Which experts stay on the provider under RunnerOptions::expert_budget; a miss always runs on the CPU.
//   Lru:    the Python runtime's policy lru (moedge.runtime.policies): a per-layer LRU. Each MoE layer
//           gets slots = int(budget / (MoE layers x mean expert bytes) + 1e-4) unpinned experts; a
//           missed expert is loaded after its CPU run, evicting the least recently used unpinned
//           experts of its own layer until it has a slot and its bytes fit the budget, never one the
//           layer chose this step; when that cannot make room nothing is evicted and it is not loaded.
//           Under one slot per layer: one LRU over all layers, by the same rule. The plan's experts
//           stay, count against the budget and not against the slots.
//   Pinned: only the plan's experts stay; nothing is admitted. (The Python runtime's policy `static`
//           with a plan keeps the same experts; without one it pins Fiddler's popularity placement,
//           which moedge_rt does not compute.)
// tests/data/expert_cache_traces.json holds the access traces both runtimes are tested against.
enum class CachePolicy { Lru, Pinned };

struct RunnerOptions {
  int intra_op_threads = 0;         // 0: ONNX Runtime's default
  bool shared_thread_pool = false;  // one process-wide pool for every session (many small graphs)
  Provider provider = Provider::Cpu;
  // Expert bytes kept on the provider. None: every expert lives there (no cache). A budget (>= 0, at
  // least the largest expert unless 0) caches experts by `policy`; misses run on the CPU.
  std::optional<int64_t> expert_budget;
  CachePolicy policy = CachePolicy::Lru;
  std::vector<std::pair<int, int>> plan;  // pinned experts (layer, expert); needs an expert_budget
  bool verify = true;                     // check every file's sha256 before loading
};

struct RunStats {
  int64_t expert_runs = 0;  // expert calls, all steps
  int64_t hits = 0;         // of them, on a resident expert
  int64_t cpu_runs = 0;     // misses computed on the CPU
  int64_t evictions = 0;
  int64_t peak_expert_bytes = 0;
  int64_t per_layer_slots = 0;  // policy lru: unpinned experts per layer; 0: one LRU over all layers
  int64_t prompt_tokens = 0;  // generate(): tokens of the prompt steps and their wall time
  double prompt_seconds = 0.0;
  int64_t decode_tokens = 0;  // generate(): one-token steps and their wall time
  double decode_seconds = 0.0;
};

// A bundle loaded into ONNX Runtime sessions, one sequence at a time. Movable, not copyable: a moved-from
// Runner may only be destroyed or assigned to. The Runners alive in a process share one ONNX Runtime
// environment (Ort::Env), made by the first and released with the last, so they must agree on
// shared_thread_pool and, with a shared pool, on intra_op_threads (else the constructor throws).
// Both stage targets run. A tensorrt bundle's stages take the KV cache as inputs and return it grown;
// an ort-cpu bundle's stages (always on the CPU: they are built for its kernels; experts still follow
// the provider) update per-layer buffers in place, which grow by doubling from max(256, 2 x the first
// step's tokens) up to the context, as moedge.runtime.static_cache.StaticCache does.
class Runner {
 public:
  explicit Runner(const std::string& bundle_dir, RunnerOptions options = {});
  ~Runner();
  Runner(Runner&&) noexcept;
  Runner& operator=(Runner&&) noexcept;
  Runner(const Runner&) = delete;
  Runner& operator=(const Runner&) = delete;

  const Manifest& manifest() const;
  // Feed `ids` after what is cached (one sequence); returns the logits of the last position. A step
  // that fails throws and forgets the sequence (the KV cache starts over).
  std::vector<float> step(const std::vector<int64_t>& ids);
  // Forget the KV cache (a new sequence).
  void reset();
  // Open every expert session the options put on the provider now, not on first use (before timing).
  void preload();
  // Tokens cached so far.
  int64_t cached_tokens() const;
  // Greedy continuation of `prompt` (starts a new sequence); stops at max_new_tokens, the model's end
  // of sequence, or the context. `first_logits` receives the prompt's last-position logits.
  std::vector<int64_t> generate(const std::vector<int64_t>& prompt, int max_new_tokens,
                                std::vector<float>* first_logits = nullptr);
  const RunStats& stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Chosen experts (tokens x top_k, best first, ties to the lower index) and float32 weights of router
// logits (tokens x experts), by the manifest's gating rule: softmax in float64, weights rounded once.
void route(const float* logits, int64_t tokens, int num_experts, const GatingRule& rule,
           std::vector<int64_t>* chosen, std::vector<float>* weights);

}  // namespace moedge
