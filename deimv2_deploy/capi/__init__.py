"""C ABI: libdeimv2.so and deimv2.h, so C and C++ programs can embed the detector.

    deimv2-capi build --output build/capi     # or build_library("build/capi")
    cc -Ibuild/capi app.c -Lbuild/capi -ldeimv2 -Wl,-rpath,$PWD/build/capi -o app

The library embeds Python with cffi (see README.md here for why, and the run-time environment).
`build` needs cffi and a C compiler; importing this package needs neither.
"""
from deimv2_deploy.capi.build import (
    HEADER_PATH,
    LIBRARY_NAME,
    BuildResult,
    build_environment,
    build_library,
    find_compiler,
)

__all__ = ["BuildResult", "build_library", "build_environment", "find_compiler", "HEADER_PATH", "LIBRARY_NAME"]
