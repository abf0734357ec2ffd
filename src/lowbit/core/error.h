// Errors raised by lowbit. Library code never aborts on bad input: it throws lowbit::Error
// with enough context (file, tensor, offset) for a user to fix the problem.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace lowbit {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

// throw_error("[gguf] ", path, ": tensor '", name, "' offset ", off, " past end of file");
template <class... Args>
[[noreturn]] void throw_error(Args&&... args) {
  throw Error(detail::concat(std::forward<Args>(args)...));
}

}  // namespace lowbit

// LB_CHECK(cond, message parts...): throws lowbit::Error when cond is false.
#define LB_CHECK(cond, ...)                                                   \
  do {                                                                        \
    if (!(cond)) ::lowbit::throw_error(__VA_ARGS__);                          \
  } while (0)
