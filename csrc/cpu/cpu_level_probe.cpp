// Build-time probe for BATCHNORM_MAX_ISA=native: CMake compiles and runs this on the build
// machine, and its exit status is the highest ISA level that machine runs (cpu/cpu_level.h).
#include "cpu/cpu_level.h"

int main() { return batchnorm::cpu::cpu_level(); }
