// Internal to moedge_rt: the books of which experts are resident on the provider under a byte budget.
// The Runner keeps the sessions; this class decides residency only. Its rules are those of the Python
// runtime's moedge.runtime.cache.ExpertCache (eviction "lru") with the per-layer slots that
// moedge.runtime.scheduler.ExpertScheduler gives the policy lru; tests/data/expert_cache_traces.json
// holds the access traces both are tested against (cpp/tests/cache_trace.cc replays them here).
#pragma once

#include <cstdint>
#include <list>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "moedge/runtime.h"

namespace moedge::detail {

// Expert residency on the accelerator under a byte budget: pinned experts stay, the rest LRU, with at
// most `per_layer_slots` unpinned experts per layer when that is > 0 (else one LRU over all layers).
class ExpertCache {
 public:
  using Key = std::pair<int, int>;  // (layer, expert)
  ExpertCache(int64_t budget_bytes, bool admit_on_miss, int64_t per_layer_slots = 0);
  // Pin `key` (a plan entry); throws when the pinned set outgrows the budget.
  void pin(const Key& key, int64_t bytes);
  // True (and marks it most recent) when `key` is resident.
  bool lookup(const Key& key);
  // Make `key` resident after a miss when the policy admits and room can be made: the least recently
  // used unpinned experts not in `protect` (of key's layer only, with per-layer slots) are evicted until
  // the bytes fit the budget and the layer has a free slot. All or nothing: when they cannot make room,
  // nothing is evicted and `key` stays out. Returns the experts evicted, least recent first.
  std::vector<Key> admit(const Key& key, int64_t bytes, const std::set<Key>& protect = {});
  // Drop a dynamic entry from the books (its session failed to load); pinned entries stay.
  void forget(const Key& key);
  bool resident(const Key& key) const { return bytes_.count(key) > 0; }
  const std::map<Key, int64_t>& residents() const { return bytes_; }  // key -> bytes, pinned included
  int64_t budget() const { return budget_; }
  int64_t used() const { return used_; }
  int64_t peak() const { return peak_; }
  int64_t per_layer_slots() const { return slots_; }

 private:
  void drop(const Key& key);  // a dynamic entry, from every book

  int64_t budget_;
  bool admit_on_miss_;
  int64_t slots_;
  int64_t used_ = 0;
  int64_t peak_ = 0;
  std::set<Key> pinned_;
  std::list<Key> lru_;  // dynamic entries; front: least recent
  std::map<Key, std::list<Key>::iterator> where_;
  std::map<Key, int64_t> bytes_;
  std::map<int, int64_t> dynamic_in_layer_;  // unpinned resident experts per layer
};

// The per-layer slots of a per-layer policy (lru), as moedge.runtime.scheduler.ExpertScheduler counts
// them: int(budget / (moe_layers * mean expert bytes) + 1e-4); 0 (one LRU over all layers) when that
// is under one slot per layer, or when there are no MoE layers or the experts hold no bytes.
// `expert_bytes`: every routed expert of every MoE layer.
int64_t per_layer_slots(int64_t budget, size_t moe_layers, const std::vector<int64_t>& expert_bytes);

// The expert cache of a Runner with an expert budget: `budget` checked (at least 0, and 0 or at least
// the largest expert), policy lru admitting misses into per-layer slots (per_layer_slots), pinned
// admitting nothing. The caller pins its plan. Throws an Error for a bad budget.
ExpertCache make_expert_cache(int64_t budget, CachePolicy policy, size_t moe_layers,
                              const std::vector<int64_t>& expert_bytes);

}  // namespace moedge::detail
