// ExpertCache: pinned experts stay; the rest are admitted after a miss and evicted least recent first,
// within their layer when the policy gives each layer slots (moedge.runtime.cache.ExpertCache.admit).
#include "expert_cache.h"

#include <algorithm>
#include <iterator>
#include <string>

namespace moedge::detail {

ExpertCache::ExpertCache(int64_t budget_bytes, bool admit_on_miss, int64_t per_layer_slots)
    : budget_(budget_bytes), admit_on_miss_(admit_on_miss), slots_(std::max<int64_t>(per_layer_slots, 0)) {}

void ExpertCache::pin(const Key& key, int64_t bytes) {
  if (pinned_.count(key)) return;
  if (auto it = where_.find(key); it != where_.end()) {  // admitted earlier: now it stays
    lru_.erase(it->second);
    where_.erase(it);
    --dynamic_in_layer_[key.first];
    pinned_.insert(key);
    return;
  }
  if (bytes > budget_ - used_)  // budget_ - used_ >= 0: no sum that could overflow
    throw Error("the placement plan needs more than the expert budget of " + std::to_string(budget_) +
                " bytes: raise --gpu-budget or write the plan for this budget");
  pinned_.insert(key);
  bytes_[key] = bytes;
  used_ += bytes;
  peak_ = std::max(peak_, used_);
}

bool ExpertCache::lookup(const Key& key) {
  if (!resident(key)) return false;
  if (auto it = where_.find(key); it != where_.end()) lru_.splice(lru_.end(), lru_, it->second);
  return true;
}

std::vector<ExpertCache::Key> ExpertCache::admit(const Key& key, int64_t bytes, const std::set<Key>& protect) {
  std::vector<Key> victims;
  if (!admit_on_miss_ || resident(key)) return victims;
  const int layer = key.first;
  int64_t free = budget_ - used_;  // >= 0, and free plus every victim's bytes is at most budget_
  int64_t slots_over = 0;
  if (slots_ > 0) {
    const auto it = dynamic_in_layer_.find(layer);
    slots_over = (it == dynamic_in_layer_.end() ? 0 : it->second) + 1 - slots_;
  }
  for (const Key& k : lru_) {  // least recent first; pinned experts are never on it
    if (free >= bytes && slots_over <= 0) break;
    if (protect.count(k) || (slots_ > 0 && k.first != layer)) continue;
    victims.push_back(k);
    free += bytes_[k];
    --slots_over;
  }
  if (free < bytes || slots_over > 0) return {};  // no room to make: evict nothing
  for (const Key& victim : victims) drop(victim);
  lru_.push_back(key);
  where_[key] = std::prev(lru_.end());
  bytes_[key] = bytes;
  ++dynamic_in_layer_[layer];
  used_ += bytes;
  peak_ = std::max(peak_, used_);
  return victims;
}

void ExpertCache::drop(const Key& key) {
  if (auto it = where_.find(key); it != where_.end()) {
    lru_.erase(it->second);
    where_.erase(it);
  }
  if (auto it = dynamic_in_layer_.find(key.first); it != dynamic_in_layer_.end() && --it->second == 0)
    dynamic_in_layer_.erase(it);
  used_ -= bytes_[key];
  bytes_.erase(key);
}

void ExpertCache::forget(const Key& key) {
  if (pinned_.count(key) || !resident(key)) return;
  drop(key);
}

int64_t per_layer_slots(int64_t budget, size_t moe_layers, const std::vector<int64_t>& expert_bytes) {
  if (moe_layers == 0 || expert_bytes.empty()) return 0;
  int64_t total = 0;  // saturates at kMaxBytes, as Manifest::expert_bytes
  for (const int64_t b : expert_bytes)
    if (__builtin_add_overflow(total, b, &total) || total > kMaxBytes) total = kMaxBytes;
  // Python: mean = sum / len (exact for totals below 2^53 bytes); slots = int(budget / (layers * mean) + 1e-4)
  const double mean = static_cast<double>(total) / static_cast<double>(expert_bytes.size());
  if (!(mean > 0.0)) return 0;  // experts of no bytes: never short of room (Python divides by zero)
  const double slots = static_cast<double>(budget) / (static_cast<double>(moe_layers) * mean) + 1e-4;
  if (!(slots >= 1.0)) return 0;  // under one slot per layer: one LRU over all layers
  return slots >= static_cast<double>(kMaxBytes) ? kMaxBytes : static_cast<int64_t>(slots);
}

ExpertCache make_expert_cache(int64_t budget, CachePolicy policy, size_t moe_layers,
                              const std::vector<int64_t>& expert_bytes) {
  if (budget < 0) throw Error("the expert budget is " + std::to_string(budget) + " bytes: give at least 0");
  const int64_t largest = expert_bytes.empty() ? 0 : *std::max_element(expert_bytes.begin(), expert_bytes.end());
  if (budget > 0 && budget < largest)
    throw Error("the expert budget of " + std::to_string(budget) + " bytes is smaller than the largest expert (" +
                std::to_string(largest) + " bytes): give at least that, or 0 to run every expert on the CPU");
  const bool lru = policy == CachePolicy::Lru;
  return ExpertCache(budget, lru, lru ? per_layer_slots(budget, moe_layers, expert_bytes) : 0);
}

}  // namespace moedge::detail
