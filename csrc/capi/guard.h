// The one door out of the library for every exported function: runs the work, and turns
// whatever the core throws into a bn_status plus the thread's message. Nothing thrown inside
// crosses the ABI, whatever its type.
#pragma once
#include <exception>
#include <new>
#include <string>

#include "batchnorm/batchnorm.h"
#include "core/errors.h"

namespace batchnorm::capi {

// The thread's message for bn_last_error(); reset by every call.
std::string& last_error();

// Records a failure's message; an allocation failure while doing so leaves the message empty
// rather than throwing out of a catch block.
inline void set_error(const char* message) noexcept {
  try {
    last_error() = message;
  } catch (...) {
    last_error().clear();
  }
}

template <class F>
bn_status guarded(F&& work) noexcept {
  try {
    last_error().clear();
    work();
    return BN_OK;
  } catch (const value_error& e) {
    set_error(e.what());
    return BN_ERROR_VALUE;
  } catch (const type_error& e) {
    set_error(e.what());
    return BN_ERROR_TYPE;
  } catch (const runtime_error& e) {
    set_error(e.what());
    return BN_ERROR_RUNTIME;
  } catch (const std::bad_alloc&) {
    set_error("out of memory");
    return BN_ERROR_RUNTIME;
  } catch (const std::exception& e) {
    set_error(e.what());
    return BN_ERROR_INTERNAL;
  } catch (...) {
    set_error("internal error: an unknown exception (please report it)");
    return BN_ERROR_INTERNAL;
  }
}

}  // namespace batchnorm::capi
