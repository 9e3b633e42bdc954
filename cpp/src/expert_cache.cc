// ExpertCache: pinned experts stay; the rest are admitted after a miss and evicted least recent first.
#include "expert_cache.h"

#include <algorithm>
#include <iterator>
#include <string>

#include "moedge/runtime.h"

namespace moedge::detail {

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

}  // namespace moedge::detail
