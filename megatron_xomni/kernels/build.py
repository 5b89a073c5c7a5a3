"""Build, load and switch the package's C kernels (`small_gemm.c`, `decode_attention.c`).

Each C source is compiled once per machine with the system C compiler (`$CC`, else `cc`/`gcc`)
into a cache folder (`$XOMNI_KERNEL_CACHE`, else `~/.cache/megatron_xomni/kernels`) under a name
that hashes the source and flags; the shared object is written to a temporary name and renamed,
so ranks that build at once never load a half-written file. Kernels are called through ctypes
with the tensors' data pointers: no copy of a parameter, no torch extension build (seconds, not
minutes). A kernel is unavailable, and its callers run their library path, without AVX-512
(torch's CPU capability), without a compiler, with `XOMNI_KERNELS=0` or after `set_enabled(False)`
(the library-only comparison of the benchmarks).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-mavx512f", "-mfma", "-shared", "-fPIC"]
_enabled = os.environ.get("XOMNI_KERNELS", "1") != "0"


def set_enabled(flag: bool) -> None:
    """Use the kernels where they apply (True, the default) or never (library paths only)."""
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def disabled():
    """Library paths only inside the block (the benchmarks' and tests' kernel-off comparison)."""
    saved = _enabled
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(saved)


def cache_dir() -> Path:
    root = os.environ.get("XOMNI_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "megatron_xomni" / "kernels"


def _compile(source: Path) -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (set CC or install gcc)")
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # included by the sources
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, str(source), "-o", tmp], capture_output=True, text=True)
        if res.returncode != 0:
            errors = [line for line in res.stderr.splitlines() if "error" in line] or res.stderr.splitlines()
            raise RuntimeError(f"{cc} failed to build {source.name}: {errors[0] if errors else res.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class Library:
    """One C source of this folder, built and loaded on first use (tried once per process).

    signatures: function name -> (restype, argtypes); the source exports `<stem>_abi()`
    returning `abi` (a stale cached build of an older source is refused, not called).
    """

    def __init__(self, source: str, abi: int, signatures: dict):
        self.source = Path(__file__).with_name(source)
        self.abi = abi
        self.signatures = signatures
        self._lib = None
        self._why_not: Optional[str] = None

    def get(self):
        """The loaded library, or None (disabled, or unavailable: see `why_unavailable`)."""
        if not _enabled:
            return None
        if self._lib is not None or self._why_not is not None:
            return self._lib
        try:
            if torch.backends.cpu.get_cpu_capability() != "AVX512":
                raise RuntimeError(f"the CPU has no AVX-512 (torch reports {torch.backends.cpu.get_cpu_capability()})")
            lib = ctypes.CDLL(str(_compile(self.source)))
            if getattr(lib, f"xomni_{self.source.stem}_abi")() != self.abi:
                raise RuntimeError(f"stale {self.source.name} build (ABI mismatch): clear {cache_dir()}")
            for name, (restype, argtypes) in self.signatures.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
            self._lib = lib
        except (OSError, RuntimeError) as e:
            self._why_not = str(e)
            log.info("%s unavailable, its callers use the library path: %s", self.source.name, e)
        return self._lib

    def why_unavailable(self) -> Optional[str]:
        """None when the kernel is usable, else why not (for benchmarks and logs)."""
        if not _enabled:
            return "disabled (kernels.build.set_enabled(False) or XOMNI_KERNELS=0)"
        self.get()
        return self._why_not
