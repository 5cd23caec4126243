"""Provenance: what ties a run's numbers to its images, its code and its machine.

Leaf functions, wired into nothing yet:

- perceptual hashes of decoded images, and the pairs of hashes within a few bits of each other,
  to find a photo that sits in train and in test under two names (a leak) or under two labels
  (a conflict), even after it was resized or re-saved as JPEG. Crops, flips and rotations are
  not looked for, and a tiny image (tens of pixels) saved at low JPEG quality may be missed;
- the facts about the software and CPU/GPU that can change a run's bits, kept apart from the
  facts that differ on every start (host, clock), so two runs' records can be compared as is;
- the code's identity: version, git commit and whether the package's files were edited.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import platform
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torch.nn.functional as F
import torchvision

import imgcls

# Within this many bits of 64, two decoded images count as one photo: the middle of the gap that
# `python -m bench.near_duplicates /tmp/groceries --copies 675` measured (resize 256 and 146): all
# 675 resized (0.5-2x) and re-saved (JPEG q60-95) copies within 4 bits of their originals, and no
# pair of the 651,160 distinct photos closer than 12 (one at 12, 15 at 14). On the tests' generated
# images (gradients and discs, 16-200 px), 2 of 2,000 copies were further than 8: 10 bits, from
# originals 21 and 23 px across saved at JPEG q60 and q63.
# pHash distances are even (each hash has 32 bits set), so 8 and 9 find the same pairs.
NEAR_DUPLICATE_BITS = 8

HASH_BITS = 64
# ITU-R BT.601 luma (PIL's convert("L")): JPEG keeps luma at full resolution and subsamples colour,
# so the hash reads what re-encoding keeps best.
LUMA = (0.299, 0.587, 0.114)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma")
# Environment variables read by the libraries under torch that choose kernels or their order of sums.
BIT_RELEVANT_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "CUBLAS_WORKSPACE_CONFIG",
    "DNNL_MAX_CPU_ISA",
    "MKL_CBWR",
    "MKL_NUM_THREADS",
    "NVIDIA_TF32_OVERRIDE",
    "OMP_NUM_THREADS",
    "ONEDNN_MAX_CPU_ISA",
)
GIT_TIMEOUT_S = 5


# -------------------------------------------------------------------------------- perceptual hash


def perceptual_hash(image: torch.Tensor) -> int:
    """A 64-bit DCT hash (pHash) of a decoded uint8 (3, H, W) image.

    Bit k says whether the k-th of the 8x8 lowest spatial frequencies of a 32x32 grey thumbnail
    is above their median: 32 bits are set for any image whose coefficients are not tied.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 (3, H, W) image, got {image.dtype} {tuple(image.shape)}")
    grey = (image.to(torch.float64) * torch.tensor(LUMA, dtype=torch.float64).view(3, 1, 1)).sum(0)
    # Area averaging (a box filter): every pixel counts, so resizing the source moves no cell much.
    small = F.adaptive_avg_pool2d(grey[None, None], (32, 32))[0, 0]
    basis = _dct_basis(32)
    low = (basis @ small @ basis.T)[:8, :8].flatten()
    # Rounding drops the last-bit noise of the sums (~1e-11 here), which can differ between CPUs'
    # kernels: a coefficient tied with the median (a flat or symmetric image) then compares alike on all.
    low = torch.round(low, decimals=6)
    bits = (low > low.median()).tolist()
    return sum(1 << (HASH_BITS - 1 - k) for k, bit in enumerate(bits) if bit)


def _dct_basis(n: int) -> torch.Tensor:
    """Rows of the (unscaled) DCT-II: the scale does not matter, only each coefficient against the median."""
    k = torch.arange(n, dtype=torch.float64)
    return torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))


def hamming(a: int, b: int) -> int:
    """Bits that differ between two hashes."""
    return (a ^ b).bit_count()


# Bytes per (a, b) pair held at once: the XOR (8), its popcounts (1) and the mask (1). Blocks of
# ~16 MB stay near the CPU's caches: 2.5-2.8 ns a pair on 2 cores, against 9-11 ns for 16-bit table
# lookups in 128 MB blocks (20k x 20k random hashes, AVX-512 VM).
_BYTES_PER_PAIR = 10
_CHUNK_BYTES = 16 * 2**20


def near_duplicates(hashes_a: list[int], hashes_b: list[int], max_distance: int) -> np.ndarray:
    """Every (i, j, distance) with hamming(hashes_a[i], hashes_b[j]) <= max_distance, in (i, j) order,
    as the rows of an int64 array of shape (pairs, 3).

    All pairs are compared, in blocks of rows of a so memory stays near _CHUNK_BYTES however long
    hashes_a is; the time grows with len(a) * len(b) (55k x 70k: ~11 s on 2 cores).
    """
    a = np.asarray(hashes_a, dtype=np.uint64)
    b = np.asarray(hashes_b, dtype=np.uint64)
    found = [np.empty((0, 3), dtype=np.int64)]
    if b.size == 0:
        return found[0]
    rows = max(1, _CHUNK_BYTES // (_BYTES_PER_PAIR * b.size))
    for start in range(0, a.size, rows):
        distance = np.bitwise_count(a[start : start + rows, None] ^ b[None, :])
        i, j = np.nonzero(distance <= max_distance)
        found.append(np.stack([i + start, j, distance[i, j]], axis=1).astype(np.int64))
    return np.concatenate(found)


# ------------------------------------------------------------------------------------ environment


def cpu_info() -> dict[str, Any]:
    """The CPU's model, the instruction sets among CPU_FLAGS it has, and the kernels torch dispatches to."""
    model, flags = _proc_cpuinfo()
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "flags": sorted(set(flags) & set(CPU_FLAGS)),
        "model": model or platform.processor() or None,
    }


def _proc_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, list[str]]:
    """(model name, flags) of the first processor listed; (None, []) where there is no such file."""
    try:
        text = path.read_text()
    except OSError:
        return None, []
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    # ARM kernels say "Features" where x86 says "flags", and may name no model at all.
    return fields.get("model name"), (fields.get("flags") or fields.get("Features") or "").split()


def bit_relevant_environment() -> dict[str, Any]:
    """Versions, threads, CPU and GPU: what can change a run's bits, and equal on two runs of one machine."""
    build = torch.__config__.show()
    facts = {
        "cpu": cpu_info(),
        "mkl": _search(r"Math Kernel Library Version (.+?) for ", build) if torch.backends.mkl.is_available() else None,
        "numpy": np.__version__,
        "onednn": _search(r"(?:oneDNN|MKL-DNN) v(\S+)", build) if torch.backends.mkldnn.is_available() else None,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "torchvision": torchvision.__version__,
        "variables": {name: os.environ.get(name) for name in BIT_RELEVANT_VARIABLES},
        **_cuda_facts(),
    }
    return dict(sorted(facts.items()))


def _cuda_facts() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"cuda": None, "cudnn": None, "gpu": None, "gpu_capability": None}
    device = torch.cuda.current_device()
    return {
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": torch.cuda.get_device_name(device),
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
    }


def _search(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text)
    return match.group(1) if match else None


def volatile_environment() -> dict[str, Any]:
    """What differs between two starts by nature: for the timings file, never for comparing bits."""
    return {
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------- code identity


def code_identity() -> dict[str, Any]:
    """imgcls's version, the git commit of its source and whether the package's files differ from it.

    commit and dirty are None when the package is not tracked by git (an installed copy), or git is
    missing or slow. dirty looks at the package folder only: a stray file beside it changes no bits.
    """
    package = Path(imgcls.__file__).resolve().parent
    # An installed copy inside some other repository (a venv in a checkout) is in a work tree but
    # tracked by none: asking for the commit there would name the wrong code.
    tracked = _git(["ls-files", "--", "__init__.py"], package)
    commit = _git(["rev-parse", "HEAD"], package) if tracked else None
    status = _git(["status", "--porcelain", "--", "."], package) if commit else None
    return {
        "commit": commit.strip() if commit else None,
        "dirty": bool(status.strip()) if status is not None else None,
        "version": imgcls.__version__,
    }


def _git(args: list[str], cwd: Path) -> str | None:
    """git's stdout, or None when git is missing, fails or takes longer than GIT_TIMEOUT_S."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in chunks: how checkpoints and weight files are identified."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
