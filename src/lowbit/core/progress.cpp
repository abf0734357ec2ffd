#include "lowbit/core/progress.h"

#include <unistd.h>

#include <atomic>
#include <cstdio>

namespace lowbit {

namespace {
std::atomic<bool> g_enabled{true};
}

void set_progress_enabled(bool enabled) { g_enabled = enabled; }
bool progress_enabled() { return g_enabled && ::isatty(2); }

ProgressBar::ProgressBar(std::string label, int64_t total, std::string unit)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), active_(progress_enabled()) {
  start_ = last_draw_ = std::chrono::steady_clock::now();
}

ProgressBar::~ProgressBar() { finish(); }

void ProgressBar::update(int64_t done, const std::string& suffix) {
  done_ = done;
  if (!active_ || finished_) return;
  auto now = std::chrono::steady_clock::now();
  if (done_ < total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  double secs = std::chrono::duration<double>(now - start_).count();
  double frac = total_ > 0 ? double(done_) / double(total_) : 0.0;
  if (frac > 1) frac = 1;
  const int width = 30;
  int fill = int(frac * width);
  char bar[width + 1];
  for (int i = 0; i < width; ++i) bar[i] = i < fill ? '#' : '.';
  bar[width] = 0;
  double eta = frac > 0 ? secs * (1 - frac) / frac : 0;
  std::fprintf(stderr, "\r%s [%s] %lld/%lld %s %.0fs<%.0fs %s\033[K", label_.c_str(), bar, (long long)done_,
               (long long)total_, unit_.c_str(), secs, eta, suffix.c_str());
  std::fflush(stderr);
}

void ProgressBar::finish() {
  if (finished_) return;
  finished_ = true;
  if (active_) {
    std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }
}

}  // namespace lowbit
