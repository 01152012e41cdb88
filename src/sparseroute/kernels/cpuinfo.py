"""What this CPU is: its model name, the instruction-set features the kernels care about, and its
caches (read from the OS: ``/proc/cpuinfo`` and ``sysconf`` on Linux; best effort elsewhere).
Bug reports (``sparseroute doctor``), the benchmarks' JSON and the kernels' tuning cache all name
the CPU this way."""

from __future__ import annotations

import functools
import os
import platform

__all__ = ["cpu_model", "cpu_vendor", "cpu_features", "cache_bytes", "FEATURES"]

#: the instruction-set extensions reported (flags as /proc/cpuinfo spells them)
FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni",
            "amx_tile", "amx_bf16", "amx_int8", "avx_ne_convert")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC 9R45 ..." ("unknown" where the OS does not say)."""
    info = _cpuinfo()
    name = info.get("model name") or info.get("Processor") or info.get("cpu model") or platform.processor()
    return " ".join(name.split()) if name else "unknown"


@functools.lru_cache(maxsize=1)
def cpu_features() -> dict[str, bool]:
    """Which of :data:`FEATURES` the CPU reports (all False where the OS does not list flags)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return {name: name in flags for name in FEATURES}


@functools.lru_cache(maxsize=None)
def cache_bytes(level: int) -> int | None:
    """The size of one core's level-``level`` data/unified cache in bytes (None when unknown):
    from sysfs (``/sys/devices/system/cpu/cpu0/cache``), else ``sysconf`` (which some virtual
    machines leave at 0)."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        entries = []
    for entry in entries:
        try:
            with open(f"{root}/{entry}/level") as f:
                lvl = int(f.read())
            with open(f"{root}/{entry}/type") as f:
                kind = f.read().strip()
            with open(f"{root}/{entry}/size") as f:
                size = f.read().strip()
        except (OSError, ValueError):
            continue
        if lvl == level and kind in ("Data", "Unified") and size:
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            try:
                return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
            except ValueError:
                continue
    names = {1: "SC_LEVEL1_DCACHE_SIZE", 2: "SC_LEVEL2_CACHE_SIZE", 3: "SC_LEVEL3_CACHE_SIZE"}
    try:
        value = os.sysconf(names[level])
    except (KeyError, ValueError, OSError, AttributeError):
        return None
    return value if value > 0 else None


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...; "unknown" where the OS
    does not say)."""
    return _cpuinfo().get("vendor_id") or "unknown"
