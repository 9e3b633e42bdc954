// ONNX Runtime's side of a Runner: the process's one Ort::Env, session options, the execution provider,
// opening a graph (and checking the provider holds some of it), running one (by value, or through an I/O
// binding with values updated in place), and ORT's errors and log as one-line messages.
#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "runner_internal.h"

namespace moedge {
namespace detail {
namespace {

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

// The EP that runs a provider's graphs, as ONNX Runtime names it.
const char* ep_name(Provider provider) {
  switch (provider) {
    case Provider::Cuda:
      return "CUDAExecutionProvider";
    case Provider::TensorRt:
      return "TensorrtExecutionProvider";
    case Provider::Cpu:
      break;
  }
  return "CPUExecutionProvider";
}

// The thread pools an Ort::Env was made with, as a message names them.
std::string pools(bool shared_thread_pool, int intra_op_threads) {
  if (!shared_thread_pool) return "per-session thread pools";
  return "one shared thread pool of " +
         (intra_op_threads > 1   ? std::to_string(intra_op_threads) + " threads"
          : intra_op_threads == 1 ? std::string("1 thread")
                                  : std::string("ONNX Runtime's default size"));
}

}  // namespace

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

std::shared_ptr<Ort::Env> shared_env(bool shared_thread_pool, int intra_op_threads) {
  // The Env and how many Runners hold it change only under the mutex, so the last holder releases it
  // (and ONNX Runtime's own instance with it) before another can be made with other thread pools.
  static std::mutex mutex;
  static Ort::Env* env = nullptr;
  static int64_t holders = 0;
  static bool env_shared = false;
  static int env_threads = 0;
  const std::lock_guard<std::mutex> lock(mutex);
  if (env != nullptr) {
    if (shared_thread_pool != env_shared || (shared_thread_pool && intra_op_threads != env_threads))
      throw Error("every Runner alive at once shares one ONNX Runtime environment, which has " +
                  pools(env_shared, env_threads) + "; this one asks for " + pools(shared_thread_pool, intra_op_threads) +
                  ": give every Runner the same shared_thread_pool and intra_op_threads");
  } else {
    if (shared_thread_pool) {
      Ort::ThreadingOptions threading;
      threading.SetGlobalIntraOpNumThreads(intra_op_threads);
      threading.SetGlobalInterOpNumThreads(1);
      env = new Ort::Env(threading, log_to_stderr, nullptr, ORT_LOGGING_LEVEL_WARNING, "moedge_rt");
    } else {
      env = new Ort::Env(ORT_LOGGING_LEVEL_WARNING, "moedge_rt", log_to_stderr, nullptr);
    }
    // One CPU arena for every session that opts in (session.use_env_allocators), not one arena each:
    // a bundle's stage sessions would otherwise each keep a prompt's worth of activations.
    const Ort::MemoryInfo cpu_memory("Cpu", OrtArenaAllocator, 0, OrtMemTypeDefault);
    const Ort::ArenaCfg arena(0, -1, -1, -1);  // ONNX Runtime's defaults
    env->CreateAndRegisterAllocator(cpu_memory, arena);
    env_shared = shared_thread_pool;
    env_threads = intra_op_threads;
  }
  ++holders;
  return std::shared_ptr<Ort::Env>(env, [](Ort::Env* held) {
    const std::lock_guard<std::mutex> release_lock(mutex);
    if (--holders > 0) return;
    delete held;
    env = nullptr;
  });
}

}  // namespace detail

using namespace detail;

const char* provider_name(Provider provider) {
  switch (provider) {
    case Provider::Cuda:
      return "cuda";
    case Provider::TensorRt:
      return "tensorrt";
    case Provider::Cpu:
      break;
  }
  return "cpu";
}

void Runner::Impl::configure_sessions() {
  env = shared_env(opt.shared_thread_pool, opt.intra_op_threads);
  for (Ort::SessionOptions* so : {&cpu_options, &provider_options}) {
    if (opt.shared_thread_pool) {
      so->DisablePerSessionThreads();
    } else {
      if (opt.intra_op_threads > 0) so->SetIntraOpNumThreads(opt.intra_op_threads);
      so->AddConfigEntry("session.intra_op.allow_spinning", "0");  // hundreds of sessions share the cores
    }
    so->SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    so->AddConfigEntry("session.use_env_allocators", "1");  // the Env's one CPU arena
  }
  provider_options.AddConfigEntry("session.record_ep_graph_assignment_info", "1");  // for check_placement
  add_provider();
}

void Runner::Impl::add_provider() {
  if (opt.provider == Provider::Cpu) return;
  if (opt.provider != Provider::Cuda && opt.provider != Provider::TensorRt)
    throw Error("unknown provider " + std::to_string(static_cast<int>(opt.provider)) + ": use cpu, cuda or tensorrt");
  const std::string ep = ep_name(opt.provider);
  if (!has_provider(ep))
    throw Error("this ONNX Runtime (" + onnxruntime_version() + ") has no " + ep +
                ": point --ort-lib at a GPU build of ONNX Runtime (onnxruntime-gpu) or use --provider cpu");
  const OrtApi& api = Ort::GetApi();
  if (opt.provider == Provider::TensorRt) {
    OrtTensorRTProviderOptionsV2* trt = nullptr;
    Ort::ThrowOnError(api.CreateTensorRTProviderOptions(&trt));
    provider_options.AppendExecutionProvider_TensorRT_V2(*trt);
    api.ReleaseTensorRTProviderOptions(trt);
  }
  OrtCUDAProviderOptionsV2* cuda = nullptr;
  Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
  provider_options.AppendExecutionProvider_CUDA_V2(*cuda);
  api.ReleaseCUDAProviderOptions(cuda);
}

std::unique_ptr<Ort::Session> Runner::Impl::open(const GraphSpec& g, const Ort::SessionOptions& so) {
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
void Runner::Impl::check_placement(const Ort::Session& session, const GraphSpec& g) const {
  const std::string ep = ep_name(opt.provider);
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


std::vector<Ort::Value> Runner::Impl::run(Ort::Session& session, const GraphSpec& g, Values& values) {
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

std::vector<Ort::Value> Runner::Impl::run_in_place(Ort::Session& session, const GraphSpec& g, Values& values,
                                                   const std::vector<InPlace>& in_place) {
  auto lists = [](const std::vector<TensorSpec>& specs, const std::string& name) {
    return std::any_of(specs.begin(), specs.end(), [&](const TensorSpec& t) { return t.name == name; });
  };
  Ort::IoBinding binding(session);
  std::set<std::string> bound_inputs, bound_outputs;
  for (const InPlace& b : in_place) {  // bound first: their outputs come first in the binding's outputs
    if (!lists(g.inputs, b.input) || !lists(g.outputs, b.output))
      throw Error(g.file + " does not take " + b.input + " and output " + b.output +
                  ", the KV buffer moedge_rt updates in place: re-split the bundle with moedge split --target ort-cpu");
    binding.BindInput(b.input.c_str(), *b.value);
    binding.BindOutput(b.output.c_str(), *b.value);
    bound_inputs.insert(b.input);
    bound_outputs.insert(b.output);
  }
  for (const auto& t : g.inputs) {
    if (bound_inputs.count(t.name)) continue;
    auto it = values.find(t.name);
    if (it == values.end()) throw Error(g.file + " needs input " + t.name + ", which no earlier stage provides");
    binding.BindInput(t.name.c_str(), it->second);
  }
  const auto cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<size_t> others;  // graph positions of the outputs bound to the CPU, in binding order
  for (size_t o = 0; o < g.outputs.size(); ++o)
    if (!bound_outputs.count(g.outputs[o].name)) {
      binding.BindOutput(g.outputs[o].name.c_str(), cpu);
      others.push_back(o);
    }
  session.Run(Ort::RunOptions{}, binding);
  std::vector<Ort::Value> got = binding.GetOutputValues();
  if (got.size() != in_place.size() + others.size())
    throw Error(g.file + ": ONNX Runtime returned " + std::to_string(got.size()) + " outputs, not " +
                std::to_string(in_place.size() + others.size()));
  std::vector<Ort::Value> outs;
  for (size_t o = 0; o < g.outputs.size(); ++o) outs.emplace_back(nullptr);
  for (size_t k = 0; k < others.size(); ++k) outs[others[k]] = std::move(got[in_place.size() + k]);
  return outs;
}

}  // namespace moedge
