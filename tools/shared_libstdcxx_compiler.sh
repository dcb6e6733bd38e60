#!/usr/bin/env bash
# Print a C++ compiler that links libstdc++ as a shared library into a Python extension: $CXX
# (default c++) if it does, else the first of g++, /usr/bin/g++ that does; exit 1 if none does.
# An extension that carries its own static copy of libstdc++ (a compiler wrapper adding
# -static-libstdc++, as some CUDA images set in CXX) crashes on its first use of the C++ locale
# once loaded beside torch: mmcv's get_compiling_cuda_version() was a segmentation fault.
# Usage: CXX=$(bash tools/shared_libstdcxx_compiler.sh) ...   (tools/install_mm.sh does this)
set -uo pipefail
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
printf '#include <sstream>\n#include <string>\nstd::string probe(int v) { std::ostringstream s; s << v; return s.str(); }\n' \
  > "$work/probe.cpp"
links_shared() {  # COMPILER: builds a shared object using iostreams and looks for libstdc++ among its needs
  "$1" -shared -fPIC -o "$work/probe.so" "$work/probe.cpp" 2> "$work/error.log" &&
    readelf -d "$work/probe.so" 2>/dev/null | grep -q 'NEEDED.*libstdc++'
}
tried=()
for compiler in "${CXX:-c++}" g++ /usr/bin/g++; do
  command -v "$compiler" > /dev/null 2>&1 || continue
  if links_shared "$compiler"; then
    echo "$compiler"
    exit 0
  fi
  tried+=("$compiler")
done
echo "shared_libstdcxx_compiler.sh: no C++ compiler here links libstdc++ as a shared library (tried: ${tried[*]:-none});" \
     "an extension built with one that links it statically crashes beside torch. Set CXX to a g++ that links" \
     "libstdc++.so (e.g. the system's /usr/bin/g++)" >&2
exit 1
