"""Build libdeimv2.so with cffi's embedding mode: `build_library(output_dir)` (or `deimv2-capi build`).

The library holds three parts: deimv2_capi.c (the public C functions: argument checks, the thread-local
error, starting Python), the `deimv2_py_*` functions cffi generates from `embedding_api` (GIL, module
start-up, calling Python), and embedded.py (the Python side, loaded by the embedding init code).
The python executable that builds the library is the environment it runs in (override: DEIMV2_PYTHON).
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deimv2_deploy
from deimv2_deploy.files import atomic_write

__all__ = ["BuildResult", "build_library", "build_environment", "find_compiler", "make_ffibuilder", "HEADER_PATH",
           "SOURCE_PATH", "LIBRARY_NAME", "MODULE_NAME"]

CAPI_DIR = Path(__file__).resolve().parent
HEADER_PATH = CAPI_DIR / "deimv2.h"
SOURCE_PATH = CAPI_DIR / "deimv2_capi.c"
LIBRARY_NAME = "libdeimv2.so"
MODULE_NAME = "_deimv2_capi"  # the Python module cffi registers inside the library

# The C declarations cffi needs: shared types, the C helper Python calls, and the functions implemented in Python.
_CDEF = """
typedef struct deimv2 deimv2_t;
typedef struct deimv2_detection { float x1, y1, x2, y2; float score; int label; } deimv2_detection;
void deimv2_internal_set_error(const char *message);
"""
_EMBEDDING_API = """
int deimv2_py_open(const char *artifact, const char *backend, const char *device, deimv2_t **out);
int deimv2_py_detect(deimv2_t *h, const uint8_t *bgr, int width, int height, int stride, float score_threshold,
                     deimv2_detection *out, int capacity, int *count);
void deimv2_py_close(deimv2_t *h);
const char *deimv2_py_class_name(deimv2_t *h, int label);
int deimv2_py_num_classes(deimv2_t *h);
int deimv2_py_max_detections(deimv2_t *h);
"""
_INIT_CODE = f"""
from {MODULE_NAME} import ffi, lib
from deimv2_deploy.capi.embedded import install
install(ffi, lib)
"""


@dataclass(frozen=True)
class BuildResult:
    library: Path
    header: Path
    environment: dict[str, Any]


def build_environment() -> dict[str, Any]:
    """What a built library depends on at run time: this python, its libpython, the package location."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ldlibrary = sysconfig.get_config_var("LDLIBRARY") or ""
    return {
        "python": sys.executable,  # not resolved: a venv's bin/python must stay the venv's
        "python_version": sysconfig.get_python_version(),
        "prefix": sys.prefix,
        "base_prefix": sys.base_prefix,
        "libpython": str(Path(libdir) / ldlibrary) if libdir and ldlibrary else None,
        "libpython_shared": bool(sysconfig.get_config_var("Py_ENABLE_SHARED")),
        "site_packages": sysconfig.get_paths()["purelib"],
        "package_root": str(Path(deimv2_deploy.__file__).resolve().parent.parent),
        "package_version": deimv2_deploy.__version__,
    }


def find_compiler() -> str | None:
    """The C compiler cffi will use (as $CC or Python's configured CC), or None when none is installed."""
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc"):
        if candidate and shutil.which(candidate.split()[0]):
            return shutil.which(candidate.split()[0])
    return None


def _c_string(value: str) -> str:
    """A C string literal for `value` (backslashes, quotes and non-printable bytes escaped)."""
    out = []
    for byte in value.encode("utf-8"):
        ch = chr(byte)
        if ch in '\\"':
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def make_ffibuilder(environment: dict[str, Any] | None = None) -> Any:
    """The cffi FFI that compiles into libdeimv2.so for `environment` (default: this python's)."""
    try:
        import cffi
    except ImportError as e:
        raise RuntimeError("building the C library needs cffi: pip install 'deimv2-deploy[capi]'") from e
    env = environment or build_environment()
    ffibuilder = cffi.FFI()
    ffibuilder.cdef(_CDEF)
    ffibuilder.embedding_api(_EMBEDDING_API)
    ffibuilder.embedding_init_code(_INIT_CODE)
    macros = (f"#define DEIMV2_BUILD_PYTHON {_c_string(env['python'])}\n"
              f"#define DEIMV2_BUILD_PACKAGE_ROOT {_c_string(env['package_root'])}\n"
              f"#define DEIMV2_BUILD_VERSION {_c_string(env['package_version'])}\n")
    link_args = ["-pthread", f"-Wl,-soname,{LIBRARY_NAME}"]
    libpython = env.get("libpython")
    if env.get("libpython_shared") and libpython:  # find libpython where it was at build time, no LD_LIBRARY_PATH
        link_args.append(f"-Wl,-rpath,{Path(libpython).parent}")
    ffibuilder.set_source(MODULE_NAME, macros + SOURCE_PATH.read_text(), include_dirs=[str(CAPI_DIR)],
                          extra_compile_args=["-pthread"], extra_link_args=link_args)
    return ffibuilder


def build_library(output_dir: str | os.PathLike, *, verbose: bool = False) -> BuildResult:
    """Compile libdeimv2.so into `output_dir` and copy deimv2.h beside it."""
    compiler = find_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (tried $CC, Python's CC and cc): install one, e.g. apt-get install gcc")
    env = build_environment()
    ffibuilder = make_ffibuilder(env)
    out = Path(output_dir)
    with tempfile.TemporaryDirectory(prefix="deimv2_capi_") as tmp:
        try:
            built = Path(ffibuilder.compile(tmpdir=tmp, target="libdeimv2.*", verbose=verbose))
        except Exception as e:  # cffi reports compiler failures as VerificationError/CompileError
            raise RuntimeError(f"compiling {LIBRARY_NAME} failed: {e}. Rerun with --verbose for the compiler "
                               "output; the Python headers (python3-dev) and a C compiler are needed") from e
        library, header = out / LIBRARY_NAME, out / HEADER_PATH.name
        # a program running the old library keeps its (unlinked) copy; header first, library last
        with atomic_write(library, header) as (library_tmp, header_tmp):
            shutil.copy2(built, library_tmp)
            shutil.copy2(HEADER_PATH, header_tmp)
    return BuildResult(library=library, header=header, environment=env)
