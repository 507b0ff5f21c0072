"""Where a measurement ran: date, commit, machine (written beside every benchmark and evaluation result)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict:
    """Date (UTC), the checkout's commit, CPU count and model, RAM, GPU (or "no GPU"), Python version."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {"cpus": os.cpu_count(), "ram_gb": round(mem / 1e6, 1), "cpu": cpu, "gpu": gpu,
            "python": platform.python_version(), "commit": commit.strip() or "?",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def describe(m: dict) -> str:
    """``m`` (:func:`machine`, or an older record whose ``machine`` is already a sentence) as one line for a
    results page: "date, commit c, 2 cores, 24.7 GB RAM, CPU, GPU"."""
    where = m.get("machine") or f"{m['cpus']} cores, {m['ram_gb']} GB RAM, {m['cpu']}, {m.get('gpu', 'no GPU')}"
    return f"{m['date']}, commit {m['commit']}, {where}"
