# CMake toolchain for cross-building lavin_edge._C for AArch64 Linux with Debian's g++-aarch64-linux-gnu
# (scripts/arm_check.sh uses it). LAVIN_EDGE_SYSROOT: an arm64 root holding the target's Python headers
# (libpython3.X-dev:arm64), e.g. the one scripts/arm_check.sh unpacks.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# Programs run on the host; libraries and headers come from the cross toolchain (its libc, libstdc++, libgomp)
# and the sysroot.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu "$ENV{LAVIN_EDGE_SYSROOT}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
