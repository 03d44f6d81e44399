"""``dsconv-tvm targets`` and ``dsconv-tvm runtime-info``: the known targets, and where the TVM
runtime for C++ programs is (:mod:`dsconv_tvm.deploy.runtime`)."""

from __future__ import annotations

import json

from .common import EXIT_OK, log


def add_parsers(sub) -> None:
    t = sub.add_parser("targets", help="list the known targets",
                       description="List the targets (targets/*.json) and their toolchains.")
    t.set_defaults(func=cmd_targets)

    ri = sub.add_parser("runtime-info", help="where the TVM runtime (headers, libraries) for C++ is",
                        description="Print where the TVM runtime headers and libraries for TARGET are "
                                    "(downloading the aarch64 runtime once), for building C++ programs "
                                    "that load the compiled .so (see tools/cpp_example).")
    ri.add_argument("--target", "-t", default="x86", help="target name (default x86 = this host)")
    what = ri.add_mutually_exclusive_group()
    for flag, dest_value, text in (("--cmake-dir", "cmake_dir", "the directory for -DDSCONV_TVM_RUNTIME_DIR "
                                                                "(holds DSConvTVMRuntimeConfig.cmake)"),
                                   ("--include-dir", "include_dir", "the include directory"),
                                   ("--lib-dir", "lib_dir", "the directory of libtvm_runtime.so, libtvm_ffi.so"),
                                   ("--json", "json", "everything as JSON")):
        what.add_argument(flag, dest="what", action="store_const", const=dest_value, help=text)
    ri.set_defaults(func=cmd_runtime_info)


def cmd_targets(_args) -> int:
    from ..target import get_target, list_targets

    for name in list_targets():
        spec = get_target(name)
        cc = spec.cross_compiler or "host g++"
        print(f"{name:<12} {spec.description}  [{cc}]")
    return EXIT_OK


def cmd_runtime_info(args) -> int:
    """Print where the runtime for ``args.target`` is."""
    from ..deploy.runtime import LIBRARIES, RuntimeUnavailable, cache_root, runtime_for_target

    try:
        rt = runtime_for_target(args.target, log=log)
    except OSError as exc:
        raise RuntimeUnavailable(f"cannot prepare the TVM runtime under {cache_root()}: "
                            f"{exc.strerror or exc}") from exc
    what = getattr(args, "what", None)
    if what == "cmake_dir":
        print(rt.cmake_dir)
    elif what == "include_dir":
        print(rt.include_dir)
    elif what == "lib_dir":
        print(rt.lib_dir)
    elif what == "json":
        print(json.dumps({"target": args.target, **rt.info()}, indent=2))
    else:
        print(f"target       {args.target} ({rt.arch})")
        print(f"source       {rt.source}")
        print(f"include dir  {rt.include_dir}")
        print(f"lib dir      {rt.lib_dir}  ({', '.join(LIBRARIES)})")
        print(f"cmake dir    {rt.cmake_dir}  (cmake -DDSCONV_TVM_RUNTIME_DIR=<this>)")
    return 0
