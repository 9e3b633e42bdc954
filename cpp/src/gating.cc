// The manifest's gating rule: router logits to chosen experts and their weights, as moedge.runtime
// does (softmax in float64, a stable sort so ties go to the lower index, weights rounded once).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "moedge/runtime.h"

namespace moedge {

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

}  // namespace moedge
