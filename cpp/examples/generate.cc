// A minimal app: load a moedge bundle, greedily continue a prompt of token ids, print the new ids.
// Build it against moedge_rt (see cpp/CMakeLists.txt); run: ./generate BUNDLE 1,2,3 [new_tokens]
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "moedge/runtime.h"

// A Runner is movable, so a function can open and return one.
moedge::Runner open_bundle(const std::string& dir) {
  moedge::load_onnxruntime(moedge::default_onnxruntime_path());  // $MOEDGE_ORT_LIB or the SDK's
  moedge::RunnerOptions options;
  options.intra_op_threads = 2;  // on the CPU; options.provider = moedge::Provider::Cuda for a GPU build
  return moedge::Runner(dir, options);  // checks every file's sha256
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s BUNDLE IDS(1,2,3) [new_tokens]\n", argv[0]);
    return 2;
  }
  try {
    std::vector<int64_t> prompt;
    std::stringstream ids(argv[2]);
    for (std::string id; std::getline(ids, id, ',');) prompt.push_back(std::stoll(id));
    const int new_tokens = argc > 3 ? std::stoi(argv[3]) : 16;
    moedge::Runner runner = open_bundle(argv[1]);
    for (int64_t token : runner.generate(prompt, new_tokens)) std::printf("%lld ", static_cast<long long>(token));
    std::printf("\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
