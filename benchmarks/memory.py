"""Peak resident memory of this process, for the benchmark scripts (Linux /proc; portable fallbacks)."""

from __future__ import annotations

import resource


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0: VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak RSS since start or the last reset (VmHWM), else getrusage's lifetime maximum."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
