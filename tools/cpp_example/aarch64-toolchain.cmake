# CMake toolchain file: cross-compile for 64-bit ARM Linux (Raspberry Pi 4/5 with a 64-bit OS)
# with the Debian/Ubuntu cross compiler (apt-get install g++-aarch64-linux-gnu).
#   cmake -S tools/cpp_example -B build-a64 -DCMAKE_TOOLCHAIN_FILE=tools/cpp_example/aarch64-toolchain.cmake \
#         -DDSCONV_TVM_RUNTIME_DIR=$(dsconv-tvm runtime-info --target rpi4 --cmake-dir)
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(DSCONV_CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "prefix of the cross compiler's name")
set(CMAKE_C_COMPILER "${DSCONV_CROSS_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${DSCONV_CROSS_PREFIX}g++")

# Libraries and headers of the target come from the cross toolchain's sysroot.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# Lets CMake (try_run, ctest) run aarch64 programs on the build machine when qemu is installed.
find_program(DSCONV_QEMU_AARCH64 qemu-aarch64-static)
if(DSCONV_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${DSCONV_QEMU_AARCH64};-L;/usr/aarch64-linux-gnu")
endif()
