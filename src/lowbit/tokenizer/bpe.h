// The merge loop shared by the BPE tokenizers: repeatedly merge the adjacent pair with the
// lowest priority value (HF: merge rank; llama2.c: minus the merged piece's score), the leftmost
// one on ties. A binary heap with lazy invalidation makes this O(n log n) per word instead of the
// O(n^2) rescans of llama2.c's run.c, with identical results: which pair wins depends only on the
// two symbols and their order, and the heap orders equal priorities by position.
#pragma once
#include <cstdint>
#include <algorithm>
#include <functional>
#include <vector>

namespace lowbit::detail {

// find(left_id, right_id, double& priority, int& merged_id) -> bool (false: the pair never merges)
template <class Find>
void bpe_merge(std::vector<int>& ids, Find&& find) {
  const int n = static_cast<int>(ids.size());
  if (n < 2) return;
  struct Candidate {
    double priority;
    int pos, left, right, merged;
    bool operator>(const Candidate& o) const {
      return priority != o.priority ? priority > o.priority : pos > o.pos;
    }
  };
  thread_local std::vector<int> prev, next;
  thread_local std::vector<Candidate> heap;  // min-heap via std::greater, reused across words
  prev.resize(n);
  next.resize(n);
  heap.clear();
  auto push = [&](int p) {
    const int q = next[p];
    if (q < 0) return;
    double pr;
    int merged;
    if (find(ids[p], ids[q], pr, merged)) {
      heap.push_back({pr, p, ids[p], ids[q], merged});
      std::push_heap(heap.begin(), heap.end(), std::greater<>{});
    }
  };
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  for (int i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>{});
    const Candidate c = heap.back();
    heap.pop_back();
    // Stale entry: the left symbol was merged away or changed, or its right neighbour changed.
    const int q = next[c.pos];
    if (ids[c.pos] != c.left || q < 0 || ids[q] != c.right) continue;
    ids[c.pos] = c.merged;
    ids[q] = -1;  // dead; position 0 never dies, so the survivors stay reachable from it
    next[c.pos] = next[q];
    if (next[q] >= 0) prev[next[q]] = c.pos;
    if (prev[c.pos] >= 0) push(prev[c.pos]);
    push(c.pos);
  }
  int out = 0;
  for (int p = 0; p >= 0; p = next[p]) ids[out++] = ids[p];
  ids.resize(out);
}

}  // namespace lowbit::detail
