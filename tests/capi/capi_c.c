/* The C99 test program of the C ABI (built by tests/test_capi.py against the installed CMake
 * package): `capi_c --version` prints the header's and the library's ABI versions; `capi_c
 * CASE...` runs each case file (harness.h). */
#include "harness.h"

int main(int argc, char** argv) {
  int i, rc;
  if (argc == 2 && !strcmp(argv[1], "--version")) {
    printf("header %d\nlibrary %d\n", BN_VERSION, bn_version());
    return 0;
  }
  for (i = 1; i < argc; ++i) {
    rc = harness_run(argv[i]);
    if (rc) return rc;
  }
  return 0;
}
