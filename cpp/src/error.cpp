#include "zeroshard/error.hpp"

#include <cstring>

namespace zeroshard {
namespace {
std::string located(const char* file, int line, const std::string& what) {
  // Only the file's base name: full build paths make messages long and leak the build machine.
  const char* base = std::strrchr(file, '/');
  return what + " [" + (base ? base + 1 : file) + ":" + std::to_string(line) + "]";
}
}  // namespace

void throw_error(const char* file, int line, const std::string& what) {
  throw Error(located(file, line, what));
}

void throw_invalid_argument(const char* file, int line, const std::string& what) {
  throw InvalidArgument(located(file, line, what));
}

}  // namespace zeroshard
