// The merge loop shared by the BPE tokenizers: repeatedly merge the adjacent pair with the
// lowest priority value (HF: merge rank; llama2.c: minus the merged piece's score), the leftmost
// one on ties. A binary heap with lazy invalidation makes this O(n log n) per word instead of the
// O(n^2) rescans of llama2.c's run.c, with identical results: which pair wins depends only on the
// two symbols and their order, and the heap orders equal priorities by position.
#pragma once
#include <cstdint>
#include <algorithm>
#include <functional>
#include <cstddef>
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

// The same result as bpe_merge(ids, find) over the whole sequence, in linear time for long
// texts: a symbol for which barrier(id) is true takes part in no merge rule, so no merge ever
// crosses it and the runs between barriers merge independently (which pair wins in one run does
// not depend on the others: priorities are per pair and ties go to the leftmost). Merging a 23 MB
// text as one sequence would build one heap of millions of entries (cache-hostile, n log n);
// here each heap holds one run. progress(symbols_done), if given, is called every ~64k symbols.
template <class Find, class Barrier>
void bpe_merge_runs(std::vector<int>& ids, Find&& find, Barrier&& barrier,
                    const std::function<void(size_t)>* progress = nullptr) {
  thread_local std::vector<int> run;
  size_t out = 0, next_report = size_t(1) << 16;
  const size_t n = ids.size();
  for (size_t i = 0; i < n;) {
    if (barrier(ids[i])) {
      ids[out++] = ids[i++];
      continue;
    }
    size_t j = i;
    while (j < n && !barrier(ids[j])) ++j;
    run.assign(ids.begin() + std::ptrdiff_t(i), ids.begin() + std::ptrdiff_t(j));
    bpe_merge(run, find);
    // A run never grows, so writing at out <= i is safe.
    for (int id : run) ids[out++] = id;
    i = j;
    if (progress && i >= next_report) {
      (*progress)(i);
      next_report = i + (size_t(1) << 16);
    }
  }
  ids.resize(out);
}

}  // namespace lowbit::detail
