"""NVIDIA GPU architectures: sm version, dp4a, the arch of this machine's GPU, whether a GPU runs here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from ...errors import TargetError


def sm_version(arch: str) -> int:
    """"sm_87" -> 87."""
    m = re.fullmatch(r"sm_(\d+)[a-z]?", str(arch))
    if not m:
        raise TargetError(f"bad CUDA arch '{arch}' (expected sm_XY, e.g. sm_87)")
    return int(m.group(1))


def has_dp4a(arch: str) -> bool:
    """int8 dot product ``dp4a`` exists from sm_61 (Pascal GP10x) on; not on sm_53 (Jetson Nano)."""
    return sm_version(arch) >= 61


def detect_gpu_arch() -> str | None:
    """sm_XY of GPU 0 from ``nvidia-smi`` (None when there is no NVIDIA GPU/driver)."""
    env = os.environ.get("DSCONV_CUDA_ARCH")
    if env:
        sm_version(env)
        return env
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    caps = [ln.strip() for ln in out.splitlines() if re.fullmatch(r"\d+\.\d+", ln.strip())]
    if not caps:
        return None
    major, minor = caps[0].split(".")
    return f"sm_{major}{minor}"


def gpu_present() -> bool:
    """True when this process can run CUDA kernels (a GPU, its driver and TVM's CUDA runtime)."""
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001  (no libcuda, no runtime: no GPU)
        return False
