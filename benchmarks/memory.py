"""This process's memory, as the speed benchmarks measure it (Linux /proc): the resident set now, and the peak
resident set (VmHWM) since the last reset. Shared by grow_speed.py and hypercloning_speed.py."""

from __future__ import annotations

import os


def rss_now() -> int:
    """Bytes resident now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Start a new peak: writing "5" to clear_refs resets VmHWM."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak() -> int:
    """Bytes of the peak resident set since the process started or ``reset_peak``."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
