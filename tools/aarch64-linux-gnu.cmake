# CMake toolchain for AArch64 Linux with Debian's cross GCC (apt: g++-aarch64-linux-gnu), used by
# tools/capi_check.sh aarch64 for the library and for the C ABI test programs built against it.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# Programs run under QEMU with the cross sysroot (try_run, and anything CMake runs itself).
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# find_package(batchnorm) in a prefix outside the sysroot (the cross build's install).
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
