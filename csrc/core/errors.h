// The core's error vocabulary: one exception per Python error kind and BN_EXPECTS, the one
// way every check is written. Messages name the argument, what was expected and what came.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace batchnorm {

// ValueError: bad values or shapes.
struct value_error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
// TypeError: bad types, dtypes or devices.
struct type_error : std::logic_error {
  using std::logic_error::logic_error;
};
// RuntimeError: a failure of the machine (CUDA errors, allocation), never of the input.
struct runtime_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}
}  // namespace detail

}  // namespace batchnorm

// BN_EXPECTS(cond, kind, message parts...): throws batchnorm::kind with the parts streamed
// together when cond is false. kind is value_error, type_error or runtime_error.
#define BN_EXPECTS(cond, kind, ...)                                        \
  do {                                                                     \
    if (!(cond)) throw ::batchnorm::kind(::batchnorm::detail::concat(__VA_ARGS__)); \
  } while (0)
