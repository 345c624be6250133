"""Which framework and device a candidate runs on.

    auto  CUDA if torch sees a GPU, else MLX on Apple Silicon (when mlx is installed),
          else Apple's MPS, else the CPU
    cuda | mps | cpu   torch (model/train.py); cpu hides any CUDA GPU from the candidate
    mlx   MLX (model/train_mlx.py), on the Apple GPU, or on the CPU where MLX has no GPU

Without a setting the sandbox takes torch's own choice, as train.py makes it (cuda, else
mps, else cpu), and `node experiment` takes mlx for a file that imports mlx. A lineage is
the baseline family a backend evolves: torch or mlx. Their files differ, so a diff of one
never applies to the other.
"""

import importlib.util
import platform
import re
import sys

BACKENDS = ("auto", "cuda", "mps", "cpu", "mlx")
INSTALL_MLX = "pip install 'autoresearch-swarm[mlx]' (on a Mac: pip install mlx)"


class BackendError(Exception):
    """A backend this machine cannot run; the message is one line saying why."""


def apple_silicon():
    return sys.platform == "darwin" and platform.machine() == "arm64"


def mlx_installed():
    try:
        return importlib.util.find_spec("mlx.core") is not None
    except ImportError:  # a broken or shadowing `mlx` package
        return False


def resolve(name):
    """The concrete backend for a setting (auto | cuda | mps | cpu | mlx); BackendError if absent."""
    if name not in BACKENDS:
        raise BackendError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    if name == "mlx":
        if not mlx_installed():
            raise BackendError(f"--backend mlx needs the mlx package: {INSTALL_MLX}")
        return "mlx"
    import torch
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mlx" if apple_silicon() and mlx_installed() else "mps" if mps else "cpu"
    if name == "cuda" and not cuda:
        raise BackendError("--backend cuda: torch sees no CUDA GPU on this machine")
    if name == "mps" and not mps:
        raise BackendError("--backend mps: torch has no MPS device on this machine (Apple Silicon with macOS 12.3+ only)")
    if name == "cpu" and mps:  # train.py picks MPS whenever it exists; no setting can hide it
        raise BackendError("--backend cpu: torch's train.py always runs on MPS on this Mac; use --backend mps or mlx")
    return name


def torch_default():
    """What train.py picks by itself: cuda, else mps, else cpu."""
    import torch
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def of_source(source):
    """The backend a candidate file asks for by its imports: mlx if it imports mlx, else torch's default."""
    return "mlx" if re.search(r"^\s*(import|from)\s+mlx\b", source, re.M) else torch_default()


def lineage(backend):
    return "mlx" if backend == "mlx" else "torch"


def environment(backend):
    """What the candidate's environment must hold for it to run on `backend`."""
    return {"CUDA_VISIBLE_DEVICES": ""} if backend == "cpu" else {}
