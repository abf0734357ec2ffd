// Helpers shared by the tests: locating ../shared data and the CLI binary.
#pragma once
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <unistd.h>

namespace lowbit::test {

// Root of the shared data: $LOWBIT_SHARED, else <repo>/../shared.
inline std::filesystem::path shared_root() {
  if (const char* e = std::getenv("LOWBIT_SHARED")) return e;
  return std::filesystem::path(LOWBIT_SOURCE_DIR).parent_path() / "shared";
}

// Full path of a file under shared/, or "" when it is absent.
inline std::string shared_file(const std::string& rel) {
  auto p = shared_root() / rel;
  return std::filesystem::exists(p) ? p.string() : std::string();
}

inline std::string cli_path() { return LOWBIT_CLI_PATH; }

// A fresh temporary directory for one test (removed at process exit is not guaranteed).
inline std::filesystem::path temp_dir(const std::string& name) {
  auto p = std::filesystem::temp_directory_path() / ("lowbit-test-" + name + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

}  // namespace lowbit::test

// Skips the test when a shared file is missing: LOWBIT_REQUIRE_SHARED(path_var, "models/x.bin");
#define LOWBIT_REQUIRE_SHARED(var, rel)                                                      \
  const std::string var = ::lowbit::test::shared_file(rel);                                   \
  if (var.empty()) GTEST_SKIP() << "shared data '" << rel << "' not found under "             \
                                << ::lowbit::test::shared_root() << " (set LOWBIT_SHARED)"
