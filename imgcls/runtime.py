"""The process a run lives in: device, seeding and determinism, RNG capture, autocast, allocator.

Everything here is process-wide state; keeping it in one module means a reader finds every global
switch imgcls flips in one place, and the stage modules stay pure functions of their inputs.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
from typing_extensions import assert_never

from imgcls import config
from imgcls.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]


def resolve_device(name: str, precision: Precision) -> torch.device:
    """The device a run uses; a precision it cannot have is refused here, before any image is decoded."""
    match name:
        case "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        case "cuda" if not torch.cuda.is_available():
            raise ConfigError("device", ['"cuda" was asked for but no CUDA device is available; use "auto" or "cpu"'])
        case _:
            device = torch.device(name)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("experiment", [config.FP16_ON_CPU])
    return device


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    # CPU: every op has a deterministic kernel. CUDA: a few backward kernels (adaptive pooling) have
    # none, so there it warns instead of failing; bit-identical runs are promised on the CPU only.
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cudnn.benchmark = False


@dataclass(frozen=True)
class Inputs:
    """How batches reach a network: `prepare` puts them on the device in the form it takes
    (uint8 images normalised, or cached features moved), and the forward runs under `precision`."""

    prepare: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    precision: Precision

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    match precision:
        case "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        case "fp16":
            return torch.autocast(device.type, dtype=torch.float16)
        case "fp32":
            return contextlib.nullcontext()
        case _:
            assert_never(precision)


# ------------------------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every generator a run may draw from: torch (dropout), CUDA, Python's random and NumPy's legacy one."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(words, dtype=torch.int64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    scalars = {"python": [version, gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["cuda"])
    version, gauss = scalars["python"]
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    name, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------- allocator

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def configure_allocator(choice: Literal["retain", "system"]) -> bool:
    """Apply train.allocator; True when the C library took the setting.

    glibc serves blocks over 32 MB with mmap and unmaps them on free, so every training step
    page-faults its activations back in (~25% of CPU time as sys for the scratch CNN @128).
    "retain" keeps them in the heap. Only the process's memory reuse changes, never a value.
    """
    match choice:
        case "system":
            return False
        case "retain":
            try:
                import ctypes

                libc = ctypes.CDLL(None)
                mallopt = libc.mallopt  # AttributeError: not glibc (musl, macOS, Windows)
            except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
                return False
            return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))
        case _:
            assert_never(choice)


def share_batches_by_file() -> None:
    """Loader workers hand batches over as named shared-memory files, not file descriptors: passing
    fds needs a handshake that prints tracebacks from every worker when Ctrl-C or a kill ends the run."""
    torch.multiprocessing.set_sharing_strategy("file_system")
