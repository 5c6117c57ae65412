"""The machine a CPU benchmark ran on, for its results file."""

import os
import platform
from pathlib import Path


def cpu_machine(threads=None):
    """CPU model, core count, load average (a shared machine slows every number) and Python."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return {"cpu": names[0] if names else platform.processor(), "cores": os.cpu_count(),
            "threads": threads, "load_average": os.getloadavg(), "python": platform.python_version()}
