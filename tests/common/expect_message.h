// The one "this call must fail with this message" helper of the tests (was a copy per file).
// Kept out of test_util.h on purpose: that header is included by ~46 test files, and this helper is
// needed by a few, so adding it there would recompile them all for nothing.
#pragma once
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "lowbit/core/error.h"

namespace lowbit::test {

// Expects f() to throw lowbit::Error whose message contains `needle`; a non-fatal failure otherwise
// (the message is shown). Returns the message ("" when nothing was thrown), for further checks.
inline std::string expect_message(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find(needle), std::string::npos) << m;
    return m;
  }
  ADD_FAILURE() << "no error, expected one mentioning '" << needle << "'";
  return {};
}

}  // namespace lowbit::test
