// moedge-run: greedy generation from token ids with a moedge bundle, through ONNX Runtime.
#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "moedge/runtime.h"

namespace {

constexpr const char* kUsage =
    "usage: moedge-run BUNDLE --ids 1,2,3 [--ids ...] [-n 16] [--threads N] [--shared-pool]\n"
    "                  [--provider cpu|cuda|tensorrt] [--gpu-budget 800MB|1.5GiB|25%|0.25] [--policy lru|pinned]\n"
    "                  [--plan PLAN.json] [--ort-lib PATH] [--no-verify] [--logits-out FILE] [--json FILE]\n"
    "                  [--warmup] [--repeats R]\n"
    "\n"
    "Greedy continuation of each prompt (token ids) with the bundle's sessions; prints the new ids, then\n"
    "prompt and decode tokens/s and the expert cache's counts. --logits-out writes each prompt's\n"
    "last-position logits (float32, prompts x vocab). --warmup opens every session and runs the first\n"
    "prompt once untimed; --repeats R generates each prompt R times and reports the median prompt and\n"
    "decode tokens/s. --threads N (1 to 4x the cores) sets each session's intra-op threads; without it\n"
    "ONNX Runtime chooses. Both stage targets run (`moedge split --target tensorrt|ort-cpu`); an ort-cpu\n"
    "bundle's stages stay on the CPU whatever the provider (its experts follow --provider). A bundle split\n"
    "with --experts-in-graph runs its experts inside its stage graphs: --provider cpu only, no cache flags.\n"
    "\n"
    "--gpu-budget keeps that many expert bytes on the provider; misses run on the CPU. It reads as in\n"
    "`moedge run`: bytes with a unit (b; KB, MB, GB = 10^3, 10^6, 10^9; KiB, MiB, GiB = 2^10, 2^20, 2^30),\n"
    "N% of the bundle's expert bytes, or a bare number (a share of them when at most 1, else bytes).\n"
    "`auto` is refused: it needs the free device memory, which only the Python runtime measures.\n"
    "--policy lru (the default) is the Python runtime's lru, a per-layer LRU: each MoE layer holds up to\n"
    "int(budget / (MoE layers x mean expert bytes) + 1e-4) unpinned experts (under one: one LRU over all\n"
    "layers); a missed expert is loaded after its CPU run, evicting its layer's least recently used\n"
    "unpinned experts, never one chosen in the same step, until it has a slot and fits the budget (else\n"
    "it is not loaded). --policy pinned: only the --plan experts stay, nothing is loaded on a miss (the\n"
    "default with --plan and no --gpu-budget). --plan pins a `moedge profile --plan` placement (the Python\n"
    "runtime's lru ignores --plan). The Python runtime's policy `static` (Fiddler's popularity\n"
    "placement, misses placed by a latency predictor) has no C++ counterpart.\n"
    "The ONNX Runtime library: --ort-lib, else $MOEDGE_ORT_LIB, else the SDK this was built with.\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string trim(const std::string& s) {
  const auto a = s.find_first_not_of(" \t");
  const auto b = s.find_last_not_of(" \t");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// `text` shortened for a one-line message.
std::string shown_arg(const std::string& text) {
  std::string out;
  for (const char c : text.substr(0, 60)) out += static_cast<unsigned char>(c) < 0x20 ? '?' : c;
  return "'" + out + (text.size() > 60 ? "...'" : "'");
}

// A whole string as an integer in [lo, hi], or a usage error naming the option.
int64_t parse_int(const std::string& text, const std::string& option, int64_t lo = LLONG_MIN, int64_t hi = LLONG_MAX) {
  const std::string t = trim(text);
  try {
    size_t used = 0;
    const long long value = std::stoll(t, &used);
    if (used == t.size() && !t.empty() && lo <= value && value <= hi) return value;
  } catch (const std::exception&) {
  }
  if (lo == LLONG_MIN && hi == LLONG_MAX) throw UsageError(option + " takes an integer, got " + shown_arg(text));
  throw UsageError(option + " must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
                   shown_arg(text));
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (trim(item).empty()) throw UsageError("--ids takes comma-separated integers, got " + shown_arg(text));
    try {
      ids.push_back(parse_int(item, "--ids"));
    } catch (const UsageError&) {
      throw UsageError("--ids takes comma-separated integers, got " + shown_arg(text));
    }
  }
  if (ids.empty() || (!text.empty() && text.back() == ','))
    throw UsageError("--ids takes comma-separated integers, got " + shown_arg(text));
  return ids;
}

double median(std::vector<double> values) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

moedge::Provider parse_provider(const std::string& text) {
  if (text == "cpu") return moedge::Provider::Cpu;
  if (text == "cuda") return moedge::Provider::Cuda;
  if (text == "tensorrt") return moedge::Provider::TensorRt;
  throw UsageError("--provider takes cpu, cuda or tensorrt, got " + shown_arg(text));
}

moedge::CachePolicy parse_policy(const std::string& text) {
  if (text == "lru") return moedge::CachePolicy::Lru;
  if (text == "pinned") return moedge::CachePolicy::Pinned;
  if (text == "static")
    throw UsageError("--policy static is the Python runtime's popularity placement (Fiddler), which moedge-run "
                     "does not have: use --policy pinned with a --plan from `moedge profile --plan`, or lru");
  throw UsageError("--policy takes lru or pinned, got " + shown_arg(text));
}

// An error message on one line.
std::string one_line(std::string text) {
  for (char& c : text)
    if (c == '\n' || c == '\r') c = ' ';
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string bundle, ort_lib = moedge::default_onnxruntime_path(), plan, logits_out, json_out;
  std::optional<moedge::Budget> budget;
  bool print_budget = false;
  std::vector<std::vector<int64_t>> prompts;
  int new_tokens = 16;
  int repeats = 1;
  bool warmup = false;
  moedge::RunnerOptions options;
  if (args.empty()) {
    std::cerr << kUsage;
    return 2;
  }
  const int64_t max_threads = 4 * std::max<int64_t>(1, std::thread::hardware_concurrency());
  try {
    for (size_t i = 0; i < args.size(); ++i) {
      const std::string& a = args[i];
      auto value = [&]() -> const std::string& {
        if (i + 1 >= args.size()) throw UsageError(a + " needs a value");
        return args[++i];
      };
      if (a == "-h" || a == "--help") {
        std::cout << kUsage;
        return 0;
      } else if (a == "--ids") {
        prompts.push_back(parse_ids(value()));
      } else if (a == "-n" || a == "--max-new-tokens") {
        new_tokens = static_cast<int>(parse_int(value(), a, 1, INT_MAX));
      } else if (a == "--threads") {
        options.intra_op_threads = static_cast<int>(parse_int(value(), a, 1, max_threads));
      } else if (a == "--shared-pool") {
        options.shared_thread_pool = true;
      } else if (a == "--provider") {
        options.provider = parse_provider(value());
      } else if (a == "--gpu-budget") {
        try {
          budget = moedge::parse_budget(value());
        } catch (const moedge::Error& e) {
          throw UsageError(e.what());
        }
      } else if (a == "--print-budget") {  // for tests: print --gpu-budget in bytes for the bundle, then exit
        print_budget = true;
      } else if (a == "--policy") {
        options.policy = parse_policy(value());
      } else if (a == "--plan") {
        plan = value();
      } else if (a == "--ort-lib") {
        ort_lib = value();
      } else if (a == "--no-verify") {
        options.verify = false;
      } else if (a == "--logits-out") {
        logits_out = value();
      } else if (a == "--warmup") {
        warmup = true;
      } else if (a == "--repeats") {
        repeats = static_cast<int>(parse_int(value(), a, 1, INT_MAX));
      } else if (a == "--json") {
        json_out = value();
      } else if (!a.empty() && a[0] == '-') {
        throw UsageError("unknown option " + a);
      } else if (bundle.empty()) {
        bundle = a;
      } else {
        throw UsageError("one bundle only, got " + shown_arg(bundle) + " and " + shown_arg(a));
      }
    }
    if (bundle.empty()) throw UsageError("give the bundle folder");
    if (print_budget && !budget) throw UsageError("--print-budget needs --gpu-budget");
    if (prompts.empty() && !print_budget) throw UsageError("give at least one prompt: --ids 1,2,3");
  } catch (const UsageError& e) {
    std::cerr << "moedge-run: error: " << one_line(e.what()) << " (moedge-run --help shows the usage)\n";
    return 2;
  }

  try {
    // The bundle and the plan are checked before ONNX Runtime is loaded or any session opened.
    const auto manifest = moedge::read_manifest(bundle, false);
    if (print_budget) {
      std::cout << budget->bytes(manifest.expert_bytes()) << '\n';
      return 0;
    }
    if (!plan.empty()) {
      options.plan = moedge::read_plan(plan, manifest);
      if (!budget) options.policy = moedge::CachePolicy::Pinned;
    }
    if (budget || !plan.empty())
      options.expert_budget = budget ? budget->bytes(manifest.expert_bytes()) : manifest.expert_bytes();
    moedge::load_onnxruntime(ort_lib);
    moedge::Runner runner(bundle, options);
    nlohmann::json generations = nlohmann::json::array();
    std::ofstream logits_file;
    if (!logits_out.empty()) {
      logits_file.open(logits_out, std::ios::binary);
      if (!logits_file) throw moedge::Error("cannot write --logits-out " + logits_out);
    }
    if (warmup) {
      runner.preload();
      runner.generate(prompts.front(), 2);  // first-run costs (arena growth, kernel choice) off the clock
    }
    const moedge::RunStats before = runner.stats();
    std::vector<double> prompt_rates, decode_rates;
    for (size_t p = 0; p < prompts.size(); ++p) {
      std::vector<float> first;
      std::vector<int64_t> ids;
      for (int r = 0; r < repeats; ++r) {
        const moedge::RunStats start = runner.stats();
        ids = runner.generate(prompts[p], new_tokens, &first);
        const moedge::RunStats& end = runner.stats();
        if (end.prompt_seconds > start.prompt_seconds)
          prompt_rates.push_back(static_cast<double>(end.prompt_tokens - start.prompt_tokens) /
                                 (end.prompt_seconds - start.prompt_seconds));
        if (end.decode_seconds > start.decode_seconds)
          decode_rates.push_back(static_cast<double>(end.decode_tokens - start.decode_tokens) /
                                 (end.decode_seconds - start.decode_seconds));
      }
      if (logits_file.is_open())
        logits_file.write(reinterpret_cast<const char*>(first.data()), static_cast<std::streamsize>(first.size() * sizeof(float)));
      std::cout << "prompt " << p << ":";
      for (int64_t t : ids) std::cout << ' ' << t;
      std::cout << '\n';
      generations.push_back({{"prompt_ids", prompts[p]}, {"token_ids", ids}});
    }
    moedge::RunStats s = runner.stats();
    s.prompt_tokens -= before.prompt_tokens;
    s.decode_tokens -= before.decode_tokens;
    s.expert_runs -= before.expert_runs;
    s.hits -= before.hits;
    s.cpu_runs -= before.cpu_runs;
    s.evictions -= before.evictions;
    const double prompt_tps = median(prompt_rates);
    const double decode_tps = median(decode_rates);
    std::printf("onnxruntime %s, provider %s\n", moedge::onnxruntime_version().c_str(),
                moedge::provider_name(options.provider));
    std::printf("prompt %lld tokens, %.1f tok/s; decode %lld tokens, %.1f tok/s (medians over prompts and repeats)\n", static_cast<long long>(s.prompt_tokens),
                prompt_tps, static_cast<long long>(s.decode_tokens), decode_tps);
    std::printf("experts: %lld runs, %lld on the provider, %lld on the CPU, %lld evictions, peak %lld bytes resident\n",
                static_cast<long long>(s.expert_runs), static_cast<long long>(s.hits), static_cast<long long>(s.cpu_runs),
                static_cast<long long>(s.evictions), static_cast<long long>(s.peak_expert_bytes));
    if (!json_out.empty()) {
      nlohmann::json doc = {{"onnxruntime", moedge::onnxruntime_version()},
                            {"provider", moedge::provider_name(options.provider)},
                            {"generations", generations},
                            {"prompt_tokens", s.prompt_tokens},
                            {"prompt_tokens_per_s", prompt_tps},
                            {"decode_tokens", s.decode_tokens},
                            {"decode_tokens_per_s", decode_tps},
                            {"expert_runs", s.expert_runs},
                            {"hits", s.hits},
                            {"cpu_runs", s.cpu_runs},
                            {"evictions", s.evictions},
                            {"peak_expert_bytes", s.peak_expert_bytes},
                            {"per_layer_slots", s.per_layer_slots > 0 ? nlohmann::json(s.per_layer_slots)
                                                                      : nlohmann::json(nullptr)}};
      std::ofstream out(json_out);
      if (!(out << doc.dump(1) << '\n')) throw moedge::Error("cannot write --json " + json_out);
    }
  } catch (const moedge::Error& e) {
    std::cerr << "moedge-run: error: " << one_line(e.what()) << '\n';
    return 1;
  } catch (const std::bad_alloc&) {
    std::cerr << "moedge-run: error: out of memory: use a smaller model, fewer tokens or a smaller --gpu-budget\n";
    return 1;
  } catch (const std::exception&) {
    std::cerr << "moedge-run: error: an unexpected internal failure: please report it with the command line\n";
    return 1;
  }
  return 0;
}
