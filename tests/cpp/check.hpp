// A minimal test harness for the C++ tests: CHECK records a failure with file and line and goes
// on; CHECK_THROWS expects an exception type; run_tests() prints a summary and returns the exit
// code ctest reads. No framework to download.
#pragma once

#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace zs_test {

inline int& failures() {
  static int count = 0;
  return count;
}

inline void report_failure(const char* file, int line, const std::string& what) {
  // Cap the output: one broken kernel should not print a million lines.
  if (++failures() <= 50) std::fprintf(stderr, "FAIL %s:%d: %s\n", file, line, what.c_str());
}

inline std::vector<std::pair<std::string, std::function<void()>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> tests;
  return tests;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().emplace_back(name, std::move(fn)); }
};

inline int run_tests() {
  for (auto& [name, fn] : registry()) {
    const int before = failures();
    try {
      fn();
    } catch (const std::exception& e) {
      report_failure(name.c_str(), 0, std::string("unexpected exception: ") + e.what());
    }
    std::printf("%s %s\n", failures() == before ? "ok  " : "FAIL", name.c_str());
  }
  std::printf("%zu tests, %d failed checks\n", registry().size(), failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace zs_test

#define ZS_TEST_CONCAT2(a, b) a##b
#define ZS_TEST_CONCAT(a, b) ZS_TEST_CONCAT2(a, b)
#define TEST(name)                                                               \
  static void name();                                                           \
  static ::zs_test::Register ZS_TEST_CONCAT(register_, name)(#name, &name);     \
  static void name()

#define CHECK(cond)                                                    \
  do {                                                                 \
    if (!(cond)) ::zs_test::report_failure(__FILE__, __LINE__, #cond); \
  } while (0)

#define CHECK_MSG(cond, msg)                                                    \
  do {                                                                          \
    if (!(cond)) ::zs_test::report_failure(__FILE__, __LINE__, std::string(#cond) + ": " + (msg)); \
  } while (0)

#define CHECK_THROWS(ExceptionType, expr)                                                   \
  do {                                                                                      \
    bool thrown_ = false;                                                                   \
    try {                                                                                   \
      (void)(expr);                                                                         \
    } catch (const ExceptionType&) {                                                        \
      thrown_ = true;                                                                       \
    } catch (...) {                                                                         \
    }                                                                                       \
    if (!thrown_) ::zs_test::report_failure(__FILE__, __LINE__, "expected " #ExceptionType " from " #expr); \
  } while (0)
