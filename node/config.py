"""Node settings: embedded defaults, then a TOML file (--config), then command-line flags."""

import math
import os
import tomllib

from sandbox.backend import BACKENDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (default, type, help)
SETTINGS = {
    "budget": (None, float, "training seconds per experiment (default: the profile's: 300 on a GPU, 30 on CPU)"),
    "profile": (None, str, "evaluation profile: gpu, cpu or tiny (slow CPUs: a quarter of cpu's evaluation; default: gpu with CUDA, else cpu)"),
    "backend": ("auto", str, "auto, cuda, mps, cpu or mlx (auto: CUDA, else MLX on Apple Silicon, else MPS, else CPU); "
                             "mlx evolves model/train_mlx.py, the others model/train.py"),
    "data": ("stdlib", str, "data source (as python -m node prepare --source): given here, prepared (instant when cached) "
                            "and used; else a home keeps the data it measured, a new home takes the data prepared "
                            "last, and this is prepared when there is none"),
    "proposer": ("auto", str, "offline, claude, or auto (claude when ANTHROPIC_API_KEY is set, else offline)"),
    "model": ("claude-sonnet-5-5", str, "the Claude proposer's model"),
    "max_tokens": (16000, int, "most tokens one Claude reply may use, thinking included"),
    "temperature": (None, float, "Claude's sampling temperature (default: the model's own; Sonnet 5 and later "
                                 "accept no other)"),
    "model_timeout": (600.0, float, "seconds one Claude proposal may take, its requests and retries together, before it counts as failed"),
    "proposer_seed": (None, int, "seed of the offline proposer (default: from the node id, so that nodes explore apart)"),
    "listen": ("0.0.0.0:7645", str, "HOST:PORT the gossip socket binds (port 0: any free one; 'off': no network)"),
    "seeds": ([], list, "HOST:PORT of peers to join through (repeat --seed); mDNS finds peers on the LAN"),
    "data_port": (None, int, "TCP port that serves this node's task files to peers (default: the gossip port + 1; "
                             "any free one when that is 0)"),
    "serve_rate": (25.0, float, "MB/s this node serves its task files at, to all peers together (0: no bound)"),
    "task": (None, str, "with --seed and no prepared data: the task id to fetch (default: the seed's task, else "
                        "the one most peers run)"),
    "mdns": (True, bool, "do not look for peers on the LAN by mDNS (config: mdns = false)"),
    "start": (None, str, "the train.py a new home starts from (default: the baseline, model/train.py)"),
    "max_experiments": (0, int, "stop after this many experiments (0: run until stopped)"),
    "baseline_runs": (2, int, "runs of the unmodified tree at the start, to measure the noise (one when peers are "
                                "alive: their claims' scores of the baseline may give it by the first verdict)"),
    "remeasure_every": (8, int, "re-measure the current best after this many experiments"),
    "max_reruns": (2, int, "extra runs of a thin win before it is kept or dropped"),
    "keep_sigmas": (2.0, float, "a keep must beat the best by this many standard errors"),
    "noise_floor": (None, float, "smallest run-to-run noise assumed, in val_bpb (default: the profile's: 0.0005 "
                                 "for gpu, 0.01 for cpu, 0.003 for tiny)"),
    "adjust_steps": (True, bool, "compare candidates' val_bpb as measured (config: adjust_steps = false); by default, on the cpu "
                                 "and tiny profiles, a candidate that changes only learning rates, decays, inits or schedule "
                                 "constants (a step's cost unchanged) is compared with the best as if both had trained the "
                                 "same number of steps: a CPU's speed varies by about a tenth between runs, and val_bpb with it"),
    "verify_share": (0.3, float, "share of run time spent verifying peers' improvements when none is strong "
                                 "(strong ones may take up to 0.75; 0: never verify)"),
    "verify_batch": (8, int, "most peers' improvements verified merged in one run (1: one at a time)"),
    "claim_settle": (2.0, float, "seconds a node waits after claiming a candidate, to see whether a peer claimed it "
                                 "first (about the time a record takes to reach the swarm; 0: no wait)"),
}
CPU_BUDGET = 30.0
# Run-to-run sd of val_bpb assumed at the least: on an H100 the baseline's is 0.0005-0.0012; on a 2-core
# CPU at 30 s it is 0.008-0.017 between runs made minutes apart (the machine's speed drifts; bench/RESULTS.md,
# "The CPU's noise floor"), and two baseline runs may by chance agree to 0.0005: a floor under that let
# one 30 s run keep noise
NOISE_FLOORS = {"gpu": 0.0005, "cpu": 0.01, "tiny": 0.003}
# Reading a run at another step count (loop.at_steps, the adjust_steps setting): val_bpb's fall per unit of
# ln(steps) that a node starts from before its own repeated runs say more (0.24 on the cpu profile: pooled over
# seven node homes' baseline pairs on a 2-core machine, 86-111 steps in 30 s), and the least run-to-run sd of
# val_bpb so read (0.0032 measured there over nine pairs, the slope fitted to them; the floor leaves room for
# both). The tiny profile's runs, shorter rows, fall faster with steps: 0.58, and 0.011 about that line, over
# six 30 s runs of the shipped file on the same machine (bench/RESULTS.md, "A CPU run read at its parent's
# step count"). A GPU's runs differ by a step in thousands: the gpu profile is read as measured.
STEP_SLOPES = {"cpu": 0.24, "tiny": 0.58}
STEP_FLOORS = {"cpu": 0.005, "tiny": 0.012}
PROFILES = ("gpu", "cpu", "tiny")  # model/prepare.py's, named here without importing it (it reads the profile once)


class ConfigError(Exception):
    pass


def load(path=None, overrides=None):
    """Settings as a dict: defaults < the file at path < overrides (None values ignored)."""
    out = {k: v[0] for k, v in SETTINGS.items()}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config {path} is not valid TOML: {e}") from None
        for key, value in raw.items():
            if key not in SETTINGS:
                raise ConfigError(f"config {path}: unknown key '{key}' (known: {', '.join(SETTINGS)})")
            out[key] = _typed(key, value, path)
    for key, value in (overrides or {}).items():
        if value is not None:
            out[key] = _typed(key, value, "the command line")
    if out["profile"] not in (None, *PROFILES):
        raise ConfigError(f"profile must be one of {', '.join(PROFILES)}, not {out['profile']!r}")
    if out["backend"] not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {out['backend']!r}")
    if out["proposer"] not in ("auto", "offline", "claude"):
        raise ConfigError(f"proposer must be offline, claude or auto, not {out['proposer']!r}")
    if out["temperature"] is not None and not 0 <= out["temperature"] <= 1:
        raise ConfigError(f"temperature must be between 0 and 1, not {out['temperature']}")
    if out["max_tokens"] < 1:
        raise ConfigError(f"max_tokens must be positive, not {out['max_tokens']}")
    for key in ("budget", "noise_floor", "keep_sigmas", "model_timeout"):
        if out[key] is not None and not out[key] > 0:
            raise ConfigError(f"{key} must be positive, not {out[key]}")
    if not 0 <= out["verify_share"] <= 1:
        raise ConfigError(f"verify_share must be between 0 and 1, not {out['verify_share']}")
    if not out["claim_settle"] >= 0:
        raise ConfigError(f"claim_settle must not be negative, not {out['claim_settle']}")
    if out["verify_batch"] < 1:
        raise ConfigError(f"verify_batch must be at least 1, not {out['verify_batch']}")
    for key in ("max_experiments", "max_reruns", "remeasure_every"):
        if out[key] < 0:
            raise ConfigError(f"{key} must not be negative, not {out[key]}")
    if out["data_port"] is not None and not 0 <= out["data_port"] <= 65535:
        raise ConfigError(f"data_port must be between 0 and 65535, not {out['data_port']}")
    if not out["serve_rate"] >= 0:
        raise ConfigError(f"serve_rate must not be negative, not {out['serve_rate']}")
    if out["listen"] != "off":
        _address(out["listen"], "listen", allow_zero=True)
    for seed in out["seeds"]:
        _address(seed, "seed")
    if out["baseline_runs"] < 2:
        raise ConfigError("baseline_runs must be at least 2: the noise is measured from them")
    return out


def noise_floor(settings):
    """The settings' noise floor, else the profile's."""
    if settings["noise_floor"] is not None:
        return settings["noise_floor"]
    return NOISE_FLOORS.get(settings["profile"], NOISE_FLOORS["cpu"])


def _typed(key, value, where):
    kind = SETTINGS[key][1]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of strings, not {value!r}")
        return list(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{where}: {key} must be {kind.__name__}, not {value!r}")
    if kind is float and not math.isfinite(value):  # TOML and argparse both take inf and nan
        raise ConfigError(f"{where}: {key} must be a finite number, not {value!r}")
    return value


def _address(text, key, allow_zero=False):
    """The transport's own parser decides what an address is; a setting also needs a host,
    and a seed a real port."""
    from gossip.discovery import split_address
    try:
        host, port = split_address(text)
    except ValueError:
        host, port = "", 0
    if not host or host == "*" or port < (0 if allow_zero else 1):
        raise ConfigError(f"{key} must be HOST:PORT (e.g. 192.168.1.20:7645), not {text!r}")
