// Internal to moedge_rt: the books of which experts are resident on the provider under a byte budget.
// The Runner keeps the sessions; this class decides residency only.
#pragma once

#include <cstdint>
#include <list>
#include <map>
#include <set>
#include <utility>
#include <vector>

namespace moedge::detail {

// Expert residency on the accelerator under a byte budget: pinned experts stay, the rest LRU.
class ExpertCache {
 public:
  using Key = std::pair<int, int>;  // (layer, expert)
  ExpertCache(int64_t budget_bytes, bool admit_on_miss);
  // Pin `key` (a plan entry); throws when the pinned set outgrows the budget.
  void pin(const Key& key, int64_t bytes);
  // True (and marks it most recent) when `key` is resident.
  bool lookup(const Key& key);
  // Make `key` resident after a miss when the policy admits; returns the experts evicted for it.
  std::vector<Key> admit(const Key& key, int64_t bytes);
  // Drop a dynamic entry from the books (its session failed to load); pinned entries stay.
  void forget(const Key& key);
  bool resident(const Key& key) const { return bytes_.count(key) > 0; }
  int64_t budget() const { return budget_; }
  int64_t used() const { return used_; }
  int64_t peak() const { return peak_; }

 private:
  int64_t budget_;
  bool admit_on_miss_;
  int64_t used_ = 0;
  int64_t peak_ = 0;
  int64_t pinned_bytes_ = 0;
  std::set<Key> pinned_;
  std::list<Key> lru_;  // front: least recent
  std::map<Key, std::list<Key>::iterator> where_;
  std::map<Key, int64_t> bytes_;
};

}  // namespace moedge::detail
