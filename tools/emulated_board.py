#!/usr/bin/env python3
"""An emulated Raspberry Pi (64-bit) for trying `dsconv-tvm bench` without a board.

It is an aarch64 CPython 3.11 (Debian bookworm arm64 packages, unpacked with ``dpkg -x``) plus the
aarch64 TVM runtime wheels and numpy, run on this x86 machine under ``qemu-aarch64-static``.  No root
is needed and nothing system-wide changes: no binfmt_misc registration, no chroot, no dpkg
architecture added (apt runs with a private state directory).  Timings of an emulated board say
nothing about the speed of a real Pi; it only checks that ARM libraries load, run and give the right
numbers over RPC.

    python tools/emulated_board.py setup          # build once (~100 MB download), cached
    python tools/emulated_board.py serve --tracker 127.0.0.1:9190 --key rpi-emu
    python tools/emulated_board.py info           # where the cache is, whether it is built

The build goes to ``$DSCONV_TVM_CACHE/emulated-board`` (default ``~/.cache/dsconv-tvm``).  It is made
in a temporary directory and renamed into place when complete (``board/DONE`` exists only in a
finished build), so an interrupted build is simply restarted.  Needs ``qemu-user-static``
(``tools/install_system_deps.sh``), ``apt-get``/``dpkg`` and pip.

Importable (the tests use it): :func:`ensure_board`, :func:`start_board_server`,
:func:`wait_registered`, :func:`board_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dsconv_tvm.deploy.runtime import cache_lock, cache_root

TVM_VERSION = "0.27.0.post1"
TVM_FFI_VERSION = "0.1.14.post1"
PY_VERSION = "3.11"
# pure-Python / aarch64-wheel packages the board's rpc_server needs besides TVM
PIP_PACKAGES = ["numpy", "ml_dtypes", "typing_extensions", "tornado", "psutil", "cloudpickle"]
# Debian bookworm arm64 packages: python3.11 and the shared libraries it and the TVM runtime load
DEBS = ["libc6", "libgcc-s1", "libstdc++6", "python3.11-minimal", "libpython3.11-minimal",
        "libpython3.11-stdlib", "libexpat1", "zlib1g", "libffi8", "libssl3", "libbz2-1.0",
        "liblzma5", "libuuid1", "libtinfo6", "libncursesw6", "libreadline8", "libsqlite3-0",
        "libgomp1", "libcrypt1", "libnsl2", "libtirpc3", "libdb5.3", "libgssapi-krb5-2",
        "libkrb5-3", "libk5crypto3", "libkrb5support0", "libcom-err2", "libkeyutils1", "libzstd1"]
DEBIAN_MIRROR = os.environ.get("DSCONV_TVM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
QEMU = "qemu-aarch64-static"
FORMAT = 1          # bump when the layout of a build changes: older builds are rebuilt

REPO_ROOT = Path(__file__).resolve().parent.parent


class BoardSetupError(RuntimeError):
    """The emulated board cannot be built or started (one sentence, shown without a traceback)."""


@dataclass(frozen=True)
class Board:
    """A finished build: ``python`` is the board's interpreter (a shell wrapper around qemu)."""

    path: Path

    @property
    def python(self) -> Path:
        return self.path / "python3"

    @property
    def site(self) -> Path:
        return self.path / "site"

    @property
    def root(self) -> Path:
        return self.path / "root"

    def info(self) -> dict:
        return json.loads((self.path / "DONE").read_text())


def board_dir(cache: str | os.PathLike | None = None) -> Path:
    """The directory holding the emulated board (``<cache>/emulated-board``)."""
    return (Path(cache).expanduser() if cache else cache_root()) / "emulated-board"


def check_qemu() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise BoardSetupError(f"{QEMU} not found: install the Debian package qemu-user-static "
                              f"(tools/install_system_deps.sh does)")
    return path


def _run(cmd, log, **kw):
    log("  $ " + " ".join(str(c) for c in cmd))
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kw)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise BoardSetupError(f"command failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return proc.stdout


def _finished(path: Path) -> bool:
    try:
        return json.loads((path / "DONE").read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def ensure_board(cache: str | os.PathLike | None = None, log=print, rebuild: bool = False) -> Board:
    """The emulated board, built first if needed (serialised with a lock file; cached)."""
    check_qemu()
    top = board_dir(cache)
    final = top / "board"
    if not rebuild and _finished(final):
        return Board(final)
    top.mkdir(parents=True, exist_ok=True)
    with cache_lock(top):
        if not rebuild and _finished(final):          # built by someone else meanwhile
            return Board(final)
        for stale in top.glob(".build-*"):           # left by an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=top))
        try:
            t0 = time.time()
            _build(work, top / "downloads", log)
            (work / "DONE").write_text(json.dumps({
                "format": FORMAT, "tvm": TVM_VERSION, "tvm_ffi": TVM_FFI_VERSION,
                "python": PY_VERSION, "built": time.strftime("%Y-%m-%d %H:%M:%S"),
                "seconds": round(time.time() - t0, 1)}, indent=1))
            if final.exists():                          # unfinished / old format / rebuild
                old = top / f".build-old-{os.getpid()}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(work, final)                      # the atomic "done"
            log(f"emulated board ready in {time.time() - t0:.0f} s: {final}")
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return Board(final)


def _apt_options(state: Path) -> list[str]:
    return ["-o", "APT::Architecture=arm64", "-o", "APT::Architectures=arm64",
            "-o", f"Dir::State={state}", "-o", f"Dir::State::Lists={state}/lists",
            "-o", f"Dir::Cache={state}/cache", "-o", "Dir::State::status=/dev/null",
            "-o", f"Dir::Etc::SourceList={state}/sources.list",
            "-o", "Dir::Etc::SourceParts=/nonexistent", "-o", "Debug::NoLocking=1",
            # as root apt would download as user _apt, which cannot write the private dirs
            *(["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else [])]


def _build(work: Path, downloads: Path, log) -> None:
    for tool, package in (("apt-get", "apt"), ("dpkg", "dpkg")):
        if shutil.which(tool) is None:
            raise BoardSetupError(f"{tool} not found (package {package}); the emulated board is "
                                  f"built from Debian packages")
    if not os.path.isfile(DEBIAN_KEYRING):
        raise BoardSetupError(f"{DEBIAN_KEYRING} not found: install the Debian package "
                              f"debian-archive-keyring")
    wheels, debs = downloads / "wheels", downloads / "debs"
    wheels.mkdir(parents=True, exist_ok=True)
    debs.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    plat = ["--only-binary=:all:", "--platform", "manylinux_2_28_aarch64",
            "--platform", "manylinux2014_aarch64", "--python-version", PY_VERSION,
            "--implementation", "cp"]

    # 1) Debian arm64 packages through a private apt state (the host's dpkg is untouched)
    log("[1/4] Debian bookworm arm64 packages (python3.11 and its libraries)")
    state = work / "apt"
    (state / "lists" / "partial").mkdir(parents=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True)
    (state / "sources.list").write_text(
        f"deb [arch=arm64 signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR} bookworm main\n")
    opts = _apt_options(state)
    _run(["apt-get", *opts, "-qq", "update"], log)
    have = {p.name.split("_")[0] for p in debs.glob("*.deb")}
    missing = [d for d in DEBS if d not in have]
    if missing:
        _run(["apt-get", *opts, "-qq", "download", *missing], log, cwd=debs)
    root = work / "root"
    root.mkdir()
    for deb in sorted(debs.glob("*_arm64.deb")):
        if deb.name.split("_")[0] in DEBS:
            _run(["dpkg", "-x", deb, root], lambda _m: None)
    shutil.rmtree(state, ignore_errors=True)
    if not (root / "usr" / "bin" / f"python{PY_VERSION}").exists():
        raise BoardSetupError(f"python{PY_VERSION} missing from the unpacked arm64 packages")

    # 2) the aarch64 TVM wheels (tagged manylinux_2_27/2_28: manylinux2014 alone finds none)
    log(f"[2/4] aarch64 wheels apache-tvm=={TVM_VERSION}, apache-tvm-ffi=={TVM_FFI_VERSION}")
    _run([*pip, "download", "-q", "--no-deps", *plat, "-d", wheels,
          f"apache-tvm=={TVM_VERSION}", f"apache-tvm-ffi=={TVM_FFI_VERSION}"], log)
    tvm_whl = sorted(wheels.glob(f"apache_tvm-{TVM_VERSION}-*aarch64*.whl"))
    ffi_whl = sorted(wheels.glob(f"apache_tvm_ffi-{TVM_FFI_VERSION}-*aarch64*.whl"))
    if not tvm_whl or not ffi_whl:
        raise BoardSetupError("the aarch64 TVM wheels were not downloaded")

    # 3) the board's site-packages, installed by this machine's pip for aarch64 / cp311
    log("[3/4] aarch64 site-packages: TVM runtime, " + ", ".join(PIP_PACKAGES))
    site = work / "site"
    _run([*pip, "install", "-q", "--target", site, *plat, "--abi", "cp311", "--abi", "abi3",
          "--abi", "none", "--no-compile", tvm_whl[-1], ffi_whl[-1], *PIP_PACKAGES], log)
    # the board only runs compiled libraries: drop the 240 MB compiler library (runtime-only TVM)
    for lib in (site / "tvm" / "lib").glob("libtvm_compiler*.so"):
        lib.unlink()
    (site / "sitecustomize.py").write_text(
        "# emulated board: child processes (TVM's popen_worker) must re-enter qemu, so\n"
        "# sys.executable is the wrapper script next to this directory\n"
        "import os, sys\n"
        "sys.executable = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),"
        " 'python3')\n")

    # 4) the board's python: a wrapper running the aarch64 interpreter under qemu-user
    log("[4/4] wrapper script and a check under qemu")
    wrapper = work / "python3"
    wrapper.write_text(f"""#!/bin/sh
# The emulated board's python (aarch64 CPython {PY_VERSION} under qemu-user), made by
# tools/emulated_board.py.  Paths are relative to this script, so the directory can move.
here=$(dirname "$(readlink -f "$0")")
PYTHONPATH="$here/site${{DSCONV_EMU_PYTHONPATH:+:$DSCONV_EMU_PYTHONPATH}}"
TVM_USE_RUNTIME_LIB=1
PYTHONNOUSERSITE=1
export PYTHONPATH TVM_USE_RUNTIME_LIB PYTHONNOUSERSITE
unset PYTHONHOME
exec {QEMU} -L "$here/root" "$here/root/usr/bin/python{PY_VERSION}" "$@"
""")
    wrapper.chmod(0o755)
    out = _run([wrapper, "-c", "import platform, numpy, tornado, psutil, cloudpickle, tvm; "
                "print(platform.machine(), 'python', platform.python_version(), 'tvm', tvm.__version__)"],
               log, timeout=600)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    if not last.startswith("aarch64"):
        raise BoardSetupError(f"the emulated python does not work: {out.strip()[-300:]}")
    log("  " + last)


# ------------------------------------------------------------------------------------------------
# optional: ONNX Runtime for the board (tools/arm_count.py), in its own cached directory
# ------------------------------------------------------------------------------------------------
def ort_site(cache: str | os.PathLike | None = None, version: str | None = None) -> Path:
    """Where the board's onnxruntime ``version`` (default: the host's) is installed:
    ``<cache>/emulated-board/ort-<version>/site`` (beside the board, not inside it, so the board
    build and its ``FORMAT`` are unchanged)."""
    return board_dir(cache) / f"ort-{version or _host_ort_version()}" / "site"


def _host_ort_version() -> str:
    try:
        from importlib.metadata import version as _v
        return _v("onnxruntime")
    except Exception:  # noqa: BLE001
        raise BoardSetupError("onnxruntime is not installed on this host (pip install onnxruntime): "
                              "its version selects the board's aarch64 wheel") from None


def ensure_ort_site(cache: str | os.PathLike | None = None, version: str | None = None,
                    log=print) -> Path:
    """The aarch64 cp311 onnxruntime wheel installed (``--no-deps``: the board's numpy is enough to
    run sessions) into :func:`ort_site`; downloaded once, cached, made atomically.  Add the returned
    directory to the board's ``PYTHONPATH``."""
    version = version or _host_ort_version()
    site = ort_site(cache, version)
    top = site.parent
    if (top / "DONE").exists():
        return site
    top.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(top.parent):
        if (top / "DONE").exists():
            return site
        work = Path(tempfile.mkdtemp(prefix=".ort-build-", dir=top.parent))
        try:
            wheels = top.parent / "downloads" / "wheels"
            wheels.mkdir(parents=True, exist_ok=True)
            pip = [sys.executable, "-m", "pip"]
            plat = ["--only-binary=:all:", "--platform", "manylinux_2_28_aarch64",
                    "--platform", "manylinux2014_aarch64", "--python-version", PY_VERSION,
                    "--implementation", "cp"]
            log(f"board: aarch64 wheel onnxruntime=={version}")
            _run([*pip, "download", "-q", "--no-deps", *plat, "-d", wheels,
                  f"onnxruntime=={version}"], log)
            whl = sorted(wheels.glob(f"onnxruntime-{version}-*aarch64*.whl"))
            if not whl:
                raise BoardSetupError(f"no aarch64 cp311 wheel of onnxruntime=={version} was downloaded")
            _run([*pip, "install", "-q", "--no-deps", "--no-compile", "--target", work / "site",
                  *plat, "--abi", "cp311", whl[-1]], log)
            (work / "DONE").write_text(json.dumps({"onnxruntime": version, "python": PY_VERSION,
                                                   "built": time.strftime("%Y-%m-%d %H:%M:%S")}))
            if top.exists():
                shutil.rmtree(top, ignore_errors=True)
            os.rename(work, top)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return site


# ------------------------------------------------------------------------------------------------
# running it
# ------------------------------------------------------------------------------------------------
def board_env(board: Board) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["DSCONV_EMU_PYTHONPATH"] = str(REPO_ROOT)      # dsconv_tvm itself (pure Python here)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_board_server(board: Board, tracker: str, key: str, port: int = 9090,
                       host: str = "127.0.0.1", stdout=None, stderr=None) -> subprocess.Popen:
    """``dsconv-tvm board-server`` under qemu, as a child process (its own session, so that the
    whole tree can be stopped; use :func:`dsconv_tvm.remote.kill_process_tree`)."""
    cmd = [str(board.python), "-m", "dsconv_tvm.cli", "board-server", "--tracker", tracker,
           "--key", key, "--host", host, "--port", str(port)]
    return subprocess.Popen(cmd, env=board_env(board), stdout=stdout, stderr=stderr,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def wait_registered(tracker: str, key: str, timeout: float = 180.0, proc=None) -> float:
    """Seconds until a server with ``key`` is registered at the tracker (error after ``timeout``
    or when ``proc`` exits)."""
    from dsconv_tvm.remote.tracker import parse_address, tracker_summary

    host, port = parse_address(tracker)
    t0 = time.time()
    while True:
        try:
            summary = tracker_summary(host, port, timeout=5)
            if any(s.get("key") == "server:" + key for s in summary.get("server_info", [])):
                return time.time() - t0
        except Exception:  # noqa: BLE001  (tracker not up yet)
            pass
        if proc is not None and proc.poll() is not None:
            raise BoardSetupError(f"the emulated board server exited with code {proc.returncode}")
        if time.time() - t0 > timeout:
            raise BoardSetupError(f"no server registered as '{key}' at {tracker} after {timeout:.0f} s")
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=None,
                   help="cache directory (default $DSCONV_TVM_CACHE or ~/.cache/dsconv-tvm)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="build the emulated board (once; cached)")
    s.add_argument("--rebuild", action="store_true", help="build again even if a build exists")
    v = sub.add_parser("serve", help="run `dsconv-tvm board-server` on the emulated board")
    v.add_argument("--tracker", required=True, help="tracker address HOST:PORT")
    v.add_argument("--key", default="rpi-emu", help="board key (default rpi-emu)")
    v.add_argument("--host", default="127.0.0.1", help="address the board server binds (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=9090, help="board server port (default 9090)")
    sub.add_parser("info", help="print where the build is and whether it is complete")
    sub.add_parser("python", help="print the path of the board's python wrapper")
    args = p.parse_args(argv)
    try:
        if args.cmd == "info":
            d = board_dir(args.cache) / "board"
            print(f"{d}: " + (json.dumps(Board(d).info()) if _finished(d) else "not built"))
            return 0
        board = ensure_board(args.cache, rebuild=getattr(args, "rebuild", False),
                             log=lambda m: print(m, flush=True))
        if args.cmd == "setup":
            print(f"board python: {board.python}")
            return 0
        if args.cmd == "python":
            print(board.python)
            return 0
        print("note: timings measured on an emulated board are meaningless for speed", flush=True)
        proc = start_board_server(board, args.tracker, args.key, args.port, args.host)
        from dsconv_tvm.remote.processes import kill_process_tree

        def _stop(*_a):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, _stop)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            kill_process_tree(proc.pid)
    except BoardSetupError as exc:
        print(f"emulated_board: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
