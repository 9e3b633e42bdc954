// moedge-api-test BUNDLE: the Runner API that moedge-run does not reach. A Runner moves (constructed,
// assigned, returned from a function, held in a vector) and keeps generating the same tokens; every
// Runner alive at once shares one Ort::Env, so a Runner asking for other thread pools gets one Error,
// and once every Runner is gone a new one may choose again; option errors are one Error each.
// Prints "ok" and exits 0, or names the first failed check and exits 1 (tests/integration/test_cpp.py).
#include <cstdio>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moedge/runtime.h"

static_assert(std::is_nothrow_move_constructible_v<moedge::Runner>);
static_assert(std::is_nothrow_move_assignable_v<moedge::Runner>);
static_assert(!std::is_copy_constructible_v<moedge::Runner> && !std::is_copy_assignable_v<moedge::Runner>);

namespace {

std::string g_bundle;
int g_failed = 0;

void check(bool ok, const char* what) {
  if (!ok && g_failed++ == 0) std::printf("failed: %s\n", what);
}

moedge::RunnerOptions options(bool shared_pool, int threads) {
  moedge::RunnerOptions o;
  o.shared_thread_pool = shared_pool;
  o.intra_op_threads = threads;
  return o;
}

moedge::Runner open(const moedge::RunnerOptions& o) { return moedge::Runner(g_bundle, o); }

// The Error message a Runner with options `o` fails with ("" when it opens).
std::string error_of(const moedge::RunnerOptions& o) {
  try {
    open(o);
  } catch (const moedge::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const char* part) { return text.find(part) != std::string::npos; }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s BUNDLE\n", argv[0]);
    return 2;
  }
  g_bundle = argv[1];
  moedge::load_onnxruntime(moedge::default_onnxruntime_path());
  const std::vector<int64_t> prompt{1, 17, 33, 50, 7};
  std::vector<int64_t> want;
  {
    moedge::Runner a = open(options(false, 1));
    want = a.generate(prompt, 8);
    moedge::Runner b = open(options(false, 2));  // per-session pools: threads may differ
    check(contains(error_of(options(true, 1)), "shares one ONNX Runtime environment"),
          "a shared pool beside per-session pools");
    moedge::Runner c = std::move(a);
    check(c.generate(prompt, 8) == want, "a move-constructed Runner generates the same tokens");
    b = std::move(c);
    check(b.generate(prompt, 8) == want, "a move-assigned Runner generates the same tokens");
    std::vector<moedge::Runner> runners;
    runners.push_back(std::move(b));
    runners.push_back(open(options(false, 1)));
    for (auto& r : runners) check(r.generate(prompt, 8) == want, "Runners in a vector generate the same tokens");
  }
  // Every Runner is gone, and with them the Env: the next one may ask for a shared pool.
  moedge::Runner shared = open(options(true, 2));
  check(shared.generate(prompt, 8) == want, "a Runner on a shared pool generates the same tokens");
  check(contains(error_of(options(true, 3)), "one shared thread pool of 2 threads"), "another shared pool size");
  moedge::RunnerOptions o = options(true, 2);
  o.expert_budget = -1;
  check(contains(error_of(o), "the expert budget is -1 bytes"), "a negative budget");
  o.expert_budget.reset();
  o.plan = {{0, 0}};
  check(contains(error_of(o), "a placement plan needs an expert budget"), "a plan without a budget");
  o.expert_budget = moedge::kMaxBytes;
  o.policy = moedge::CachePolicy::Pinned;
  moedge::Runner pinned = open(o);
  check(pinned.generate(prompt, 8) == want, "a pinned cache generates the same tokens");
  const moedge::RunStats& s = pinned.stats();
  check(s.hits > 0 && s.cpu_runs > 0 && s.evictions == 0 && s.hits + s.cpu_runs == s.expert_runs,
        "pinned: the plan's expert on the provider, every other on the CPU, nothing admitted");
  if (g_failed == 0) std::printf("ok\n");
  return g_failed == 0 ? 0 : 1;
}
