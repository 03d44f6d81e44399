# CMake toolchain file: cross-compile for 32-bit ARM Linux (Raspberry Pi OS 32-bit, armv7l,
# hard float) with the Debian/Ubuntu cross compiler (apt-get install g++-arm-linux-gnueabihf).
# There is no armv7 TVM wheel: the runtime must be built from the TVM source first (see
# `dsconv-tvm runtime-info --target rpi-armv7`).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR armv7l)

set(DSCONV_CROSS_PREFIX "arm-linux-gnueabihf-" CACHE STRING "prefix of the cross compiler's name")
set(CMAKE_C_COMPILER "${DSCONV_CROSS_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${DSCONV_CROSS_PREFIX}g++")

set(CMAKE_FIND_ROOT_PATH /usr/arm-linux-gnueabihf)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

find_program(DSCONV_QEMU_ARM qemu-arm-static)
if(DSCONV_QEMU_ARM)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${DSCONV_QEMU_ARM};-L;/usr/arm-linux-gnueabihf")
endif()
