"""deimv2-capi: build libdeimv2.so + deimv2.h for C/C++ programs, and say how to compile, link and run them."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from deimv2_deploy.cli import run_cli

__all__ = ["main", "build_parser", "link_command"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deimv2-capi",
        description="The C ABI: libdeimv2.so (the detector in an embedded Python, through cffi) and its header.",
        epilog="Examples:\n  deimv2-capi build --output build/capi\n  deimv2-capi info --output build/capi\n"
               "  cc -Ibuild/capi app.c -o app -Lbuild/capi -ldeimv2 -Wl,-rpath,$PWD/build/capi\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="compile libdeimv2.so and copy deimv2.h into a folder")
    build.add_argument("--output", required=True, help="folder for libdeimv2.so and deimv2.h")
    build.add_argument("--verbose", action="store_true", help="show the compiler's output")
    build.add_argument("--json", action="store_true", help="print paths and environment as JSON")
    info = sub.add_parser("info", help="how to compile/link against the library and which Python it needs")
    info.add_argument("--output", default="build/capi", help="folder the library is (or will be) built into")
    info.add_argument("--json", action="store_true", help="print as JSON")
    return p


def link_command(folder: str | Path, source: str = "app.c", program: str = "app") -> str:
    d = Path(folder).resolve()
    return f"cc -I{d} {source} -o {program} -L{d} -ldeimv2 -Wl,-rpath,{d}"


def _info(folder: str) -> dict[str, Any]:
    from deimv2_deploy.capi import build_environment, find_compiler

    try:
        import cffi

        cffi_version: str | None = cffi.__version__
    except ImportError:
        cffi_version = None
    library = Path(folder).resolve() / "libdeimv2.so"
    return {"library": str(library), "built": library.exists(), "compile": link_command(folder),
            "compiler": find_compiler(), "cffi": cffi_version, "environment": build_environment()}


def _print_info(info: dict[str, Any]) -> None:
    env = info["environment"]
    print(f"libdeimv2 (deimv2-deploy {env['package_version']}, Python {env['python_version']})")
    print(f"  library      {info['library']}" + ("" if info["built"] else "  (not built yet: deimv2-capi build)"))
    print(f"  compile      {info['compile']}")
    print(f"  runs in      {env['python']}  (site-packages {env['site_packages']})")
    print(f"  libpython    {env['libpython']}  (found through the library's RUNPATH)")
    print(f"  package      {env['package_root']}  (added to sys.path last, for source checkouts)")
    print(f"  C compiler   {info['compiler'] or 'NOT FOUND (install gcc or clang)'}")
    print(f"  cffi         {info['cffi'] or 'NOT INSTALLED (pip install deimv2-deploy[capi])'}")
    print("At run time the library starts Python as the python above, so that environment (and libpython) must\n"
          "stay where they are. To use another environment: DEIMV2_PYTHON=/path/to/env/bin/python ./app\n"
          "(it needs deimv2-deploy, numpy, opencv-python-headless, cffi and the backend's package).")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        if args.command == "info":
            info = _info(args.output)
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                _print_info(info)
            return 0
        from deimv2_deploy.capi import build_library

        result = build_library(args.output, verbose=args.verbose)
        if args.json:
            print(json.dumps({"library": str(result.library), "header": str(result.header),
                              "compile": link_command(args.output), "environment": result.environment}, indent=2))
        else:
            print(f"wrote {result.library}\n  and {result.header}")
            print(f"  compile: {link_command(args.output)}")
            print(f"  runs in: {result.environment['python']} (override with DEIMV2_PYTHON; see deimv2-capi info)")
        return 0

    return run_cli(body, "deimv2-capi")


if __name__ == "__main__":
    sys.exit(main())
