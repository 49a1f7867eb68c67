// zeroshard::Error and the checking macros every core function uses at its boundary.
// Owns: how a failure is described (call, file, line). Knows nothing of CUDA, NCCL or Python;
// the CUDA and NCCL checks build on throw_error() in their own headers.
#pragma once

#include <stdexcept>
#include <string>

namespace zeroshard {

// Any failure inside the core: a failed CUDA/NCCL call, a failed allocation, a timeout.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A caller passed something the core cannot work with (sizes, dtypes, null pointers).
// Surfaces in Python as ValueError.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

[[noreturn]] void throw_error(const char* file, int line, const std::string& what);
[[noreturn]] void throw_invalid_argument(const char* file, int line, const std::string& what);

}  // namespace zeroshard

// Validates an argument; `msg` is any expression convertible to std::string.
#define ZS_REQUIRE(cond, msg)                                                     \
  do {                                                                            \
    if (!(cond)) ::zeroshard::throw_invalid_argument(__FILE__, __LINE__, (msg)); \
  } while (0)
