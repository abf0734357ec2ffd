// A progress bar on stderr for long work. Silent when stderr is not a terminal (logs, CI) or
// when disabled with set_progress_enabled(false) (the CLI's --quiet).
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace lowbit {

void set_progress_enabled(bool enabled);
bool progress_enabled();

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, std::string unit = "");
  ~ProgressBar();
  void update(int64_t done, const std::string& suffix = "");  // absolute position
  void advance(int64_t n = 1, const std::string& suffix = "") { update(done_ + n, suffix); }
  void finish();

 private:
  std::string label_, unit_;
  int64_t total_, done_ = 0;
  bool active_, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace lowbit
