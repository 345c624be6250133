"""What one sandboxed run returns: a frozen record, also as one JSON object."""

import dataclasses
import json
import platform


@dataclasses.dataclass(frozen=True)
class HardwareTag:
    """What a number was measured on; results compare only within one tag."""
    accelerator: str        # e.g. "NVIDIA H100 80GB HBM3", or the CPU model
    count: int
    backend: str            # cuda | mps | cpu
    framework: str          # e.g. "torch 2.13.0"
    budget_seconds: float
    profile: str
    data_fingerprint: str   # covers the tokenizer and every token of both splits

    @classmethod
    def detect(cls, budget_seconds, profile, data_fingerprint):
        import torch
        if torch.cuda.is_available():
            name, count, backend = torch.cuda.get_device_name(0), torch.cuda.device_count(), "cuda"
        elif torch.backends.mps.is_available():
            name, count, backend = platform.processor() or "Apple", 1, "mps"
        else:
            name, count, backend = _cpu_name(), 1, "cpu"
        return cls(name, count, backend, f"torch {torch.__version__.split('+')[0]}", float(budget_seconds), profile, data_fingerprint)


def _cpu_name():
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
