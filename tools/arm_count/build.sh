#!/bin/sh
# Build the insn_count QEMU plugin with the host C compiler: tools/arm_count/build.sh [OUT.so]
# (default: insn_count.so next to this script).  tools/arm_count.py builds it on demand into the
# cache directory instead.
set -eu
here=$(dirname "$(readlink -f "$0")")
out=${1:-$here/insn_count.so}
${CC:-cc} -O2 -Wall -Wextra -Werror -fPIC -shared -fvisibility=hidden -o "$out" \
    "$here/insn_count.c" -lpthread
echo "$out"
