// The C++ test program of the C ABI: the same case runner as the C program (harness.h,
// compiled as C++), the DLPack struct layout fixed by the spec, and `--threads`, which checks
// that bn_last_error() is per thread.
#include <cstddef>
#include <cstdio>
#include <future>
#include <string>
#include <thread>

#include "harness.h"

// DLPack 1.x on LP64: what any producer's DLTensor looks like.
static_assert(sizeof(DLDevice) == 8, "DLDevice is two 32-bit fields");
static_assert(sizeof(DLDataType) == 4, "DLDataType is code, bits, lanes");
static_assert(offsetof(DLTensor, device) == 8 && offsetof(DLTensor, ndim) == 16 && offsetof(DLTensor, dtype) == 20 &&
                  offsetof(DLTensor, shape) == 24 && offsetof(DLTensor, strides) == 32 &&
                  offsetof(DLTensor, byte_offset) == 40 && sizeof(DLTensor) == 48,
              "DLTensor has the spec's layout");

// One thread fails, another then succeeds: the first still reads its own message.
static int check_thread_local_errors() {
  std::promise<void> failed, succeeded;
  std::string first_message, second_message;
  bn_status first = BN_OK, second = BN_ERROR_INTERNAL;
  std::thread a([&] {
    first = bn_set_num_threads(0);
    failed.set_value();
    succeeded.get_future().wait();
    first_message = bn_last_error();
  });
  std::thread b([&] {
    failed.get_future().wait();
    second = bn_set_num_threads(bn_get_num_threads());
    second_message = bn_last_error();
    succeeded.set_value();
  });
  a.join();
  b.join();
  std::printf("first %d %s\nsecond %d %s\n", int(first), first_message.c_str(), int(second), second_message.c_str());
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--version") {
    std::printf("header %d\nlibrary %d\n", BN_VERSION, bn_version());
    return 0;
  }
  if (argc == 2 && std::string(argv[1]) == "--threads") return check_thread_local_errors();
  for (int i = 1; i < argc; ++i) {
    const int rc = harness_run(argv[i]);
    if (rc) return rc;
  }
  return 0;
}
