"""What one sandboxed run returns: a frozen record, also as one JSON object."""

import dataclasses
import json
import os
import platform
import subprocess
import sys


@dataclasses.dataclass(frozen=True)
class HardwareTag:
    """What a number was measured on; results compare only within one tag."""
    accelerator: str        # e.g. "NVIDIA H100 80GB HBM3", "Apple M4 Max", or the CPU model
    count: int
    backend: str            # cuda | mps | cpu | mlx
    framework: str          # e.g. "torch 2.13.0", "mlx 0.32.4"
    budget_seconds: float
    profile: str
    data_fingerprint: str   # covers the tokenizer and every token of both splits
    device: str             # gpu | cpu: where the framework computes
    memory_gb: int          # of the accelerator: GPU memory, Apple's unified memory, or the machine's RAM

    @classmethod
    def detect(cls, budget_seconds, profile, data_fingerprint, backend=None):
        """The tag of this machine for `backend` (default: torch's own choice, as train.py makes it)."""
        from sandbox import backend as backends
        backend = backends.resolve(backend) if backend else backends.torch_default()
        if backend == "mlx":
            import mlx.core as mx
            # on a Mac: device_name "Apple M4 Max", memory_size in bytes (older mlx: mx.metal.device_info)
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            name, count, framework = info.get("device_name") or _cpu_name(), 1, f"mlx {mx.__version__}"
            device = "gpu" if mx.default_device() == mx.gpu else "cpu"
            memory = info.get("memory_size") or info.get("total_memory") or _ram()
        else:
            import torch
            framework, device, memory, count = f"torch {torch.__version__.split('+')[0]}", "gpu", _ram(), 1
            if backend == "cuda":
                name, count = torch.cuda.get_device_name(0), torch.cuda.device_count()
                memory = torch.cuda.get_device_properties(0).total_memory
            elif backend == "mps":
                name = _apple_chip() or platform.processor() or "Apple"
            else:
                name, device = _cpu_name(), "cpu"
        return cls(name, count, backend, framework, float(budget_seconds), profile, data_fingerprint, device,
                   round(memory / 2**30))


def _ram():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _apple_chip():
    """e.g. "Apple M4 Max" on macOS, else None."""
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _cpu_name():
    if sys.platform == "darwin":
        chip = _apple_chip()
        if chip:
            return chip
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


STATUSES = ("ok", "crash", "timeout", "violation")


@dataclasses.dataclass(frozen=True)
class Result:
    status: str                      # one of STATUSES
    val_bpb: float | None            # computed by the harness; only when status == "ok"
    training_seconds: float          # wall seconds from launch to the model hand-over (startup included)
    total_seconds: float             # wall seconds of the whole run
    evaluation_seconds: float | None  # hand-over to the end of the harness's evaluation
    peak_memory_mb: float            # peak resident memory of the candidate's processes
    num_steps: int | None            # as the candidate printed it: informational, untrusted
    tokens: int | None               # likewise
    violations: tuple[str, ...]      # named checks that failed
    probe_max_diff: float | None     # largest change of a logit before a probe's cut (see LIMITS' probe_tolerance)
    hardware: HardwareTag
    isolation: tuple[str, ...]       # what confined the candidate on this machine
    log_tail: str                    # the last lines of its output (a traceback on a crash)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), sort_keys=True)
