"""Checkpoints: safetensors files that never unpickle anything, with a content hash.

One file holds the model weights ("model.*"), optionally the optimizer's tensors ("optim.*") and
the RNG state ("rng.*"), and a JSON header: class names, the resolved experiment, the epoch, the
loop's state. A sha256 over the header and every tensor's bytes catches truncation and bit flips.
Files are written atomically: temp file in the same folder, fsync, rename.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from imgcls import config
from imgcls.errors import CheckpointError, NonFiniteWeights, WriteError

FORMAT = "imgcls-checkpoint/1"
TEMP_PREFIX = ".tmp-"


@dataclass
class Checkpoint:
    """model: the trained weights; ema: their moving average (train.ema_decay), else empty."""

    model: dict[str, torch.Tensor]
    meta: dict[str, Any]
    optim: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The weights that evaluation and prediction use: the average when the run kept one."""
        return self.ema or self.model

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def experiment(self, path: str | Path) -> config.Experiment:
        """The resolved experiment the weights were trained with, as the run stored it."""
        return config.loads(self.meta["experiment"], f"{path} (stored experiment)")


def save(path: str | Path, ckpt: Checkpoint) -> None:
    """Write a checkpoint atomically; weights holding NaN or inf are refused, never written."""
    ema = {f"ema.{k}": v for k, v in ckpt.ema.items()}
    named = ckpt.model | ema  # how the error names them
    bad = [k for k, v in named.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        after = f" after epoch {ckpt.meta['epoch']}" if "epoch" in ckpt.meta else ""
        raise NonFiniteWeights(
            f"{path}: not saved: the weights became NaN or infinite{after} ({', '.join(bad[:3])}); "
            "the previous checkpoint is kept. Lower optimizer.lr, or check the data"
        )
    tensors = {f"model.{k}": v for k, v in ckpt.model.items()} | ema
    tensors |= {f"optim.{k}": v for k, v in ckpt.optim.items()}
    tensors |= {f"rng.{k}": v for k, v in ckpt.rng.items()}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = json.dumps({"format": FORMAT, **ckpt.meta}, sort_keys=True)
    metadata = {"imgcls": header, "sha256": _digest(header, tensors)}
    atomic_write(Path(path), _canonical(st_save(tensors, metadata=metadata)))


def _canonical(blob: bytes) -> bytes:
    """The same file with its JSON header's keys sorted.

    safetensors writes the header from a hash map, so its key order (and the file's SHA-256)
    changes from process to process. Data offsets count from the end of the header, so a
    rewritten header (space-padded to 8 bytes, as safetensors aligns it) leaves them valid.
    """
    size = int.from_bytes(blob[:8], "little")
    text = json.dumps(json.loads(blob[8 : 8 + size]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    header = text.encode().ljust(-(-len(text.encode()) // 8) * 8)
    return len(header).to_bytes(8, "little") + header + blob[8 + size :]


def load(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: imgcls checkpoints are .safetensors files (pickled .pt/.pth files are refused)")
    try:
        data = path.read_bytes()  # read once: the tensors and the header checked are the same bytes
        tensors = st_load(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or damaged ({e})") from None
    header = metadata.get("imgcls")
    if header is None:
        raise CheckpointError(f"{path}: a safetensors file, but not an imgcls checkpoint (no imgcls header)")
    if metadata.get("sha256") != _digest(header, tensors):
        raise CheckpointError(f"{path}: content hash mismatch: the file is damaged; use another checkpoint")
    meta = json.loads(header)
    if not isinstance(meta, dict) or meta.pop("format", None) != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format (expected {FORMAT})")
    parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optim": {}, "rng": {}, "ema": {}}
    for key, value in tensors.items():
        group, _, name = key.partition(".")
        if group not in parts:
            raise CheckpointError(f"{path}: unexpected tensor {key!r}; not an imgcls checkpoint")
        parts[group][name] = value
    return Checkpoint(parts["model"], meta, parts["optim"], parts["rng"], parts["ema"])


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A plain state dict for model.weights: an imgcls checkpoint, a .safetensors file, or a .pth/.pt."""
    p = Path(path)
    if p.suffix == ".safetensors":
        try:
            raw = p.read_bytes()
            tensors, is_imgcls = st_load(raw), "imgcls" in _metadata(raw)
        except (SafetensorError, ValueError, RuntimeError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        return load(path).weights if is_imgcls else tensors
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0") not in ("", "0"):
        # That variable turns weights_only=True off inside torch.load: a pickle could then run code.
        raise CheckpointError(
            f"{path}: refusing to read a pickled file while TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set; "
            "unset it or convert the weights to .safetensors"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for anything but plain tensors, plus zip errors
        raise CheckpointError(f"{path}: not a plain state dict that loads with weights_only=True ({e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def _metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file that st_load has already validated (JSON, never pickle)."""
    size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not a table")
    return metadata


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes: equal iff the weights are bit-identical."""
    return _digest("", state)


def _digest(header: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(header.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- atomic files


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write via a temp file in the same folder, fsync, rename: a crash leaves the old file whole.

    The file gets the permissions the umask gives any new file (0666 & ~umask, e.g. 0644):
    mkstemp creates its temp files 0600, readable by their owner only.
    """
    payload = data.encode() if isinstance(data, str) else data
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the rename makes them the file
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise WriteError(
                f"{path}: disk full while saving ({e.strerror}); the previous file, if any, is intact. "
                "Free some space, then continue with --resume"
            ) from None
        raise WriteError(f"{path}: cannot write ({e.strerror or e}); the previous file, if any, is intact") from None
    finally:
        if tmp is not None:  # also on Ctrl-C or SIGTERM; a kill -9 leaves it to clean_temp_files
            Path(tmp).unlink(missing_ok=True)


def clean_temp_files(folder: Path) -> list[Path]:
    """Leftovers of a save interrupted by a kill; never resumed from."""
    leftovers = sorted(folder.glob(TEMP_PREFIX + "*")) if folder.is_dir() else []
    for p in leftovers:
        p.unlink(missing_ok=True)
    return leftovers


# ------------------------------------------------------------------------ nested state <-> tensors


def flatten_state(state: Any, prefix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (optimizer or scheduler state_dict) into tensors and a JSON skeleton.

    Tensors are replaced by {"__tensor__": key}; dict keys become strings and are restored by
    unflatten_state (optimizer states key parameters by int).
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, (list, tuple)):
            return {"__tuple__" if isinstance(value, tuple) else "__list__": [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint")

    return tensors, walk(state, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if "__list__" in skeleton:
            return [unflatten_state(v, tensors) for v in skeleton["__list__"]]
    return skeleton


PROC_STATUS = "/proc/self/status"


def current_umask() -> int:
    """The process's umask. Linux shows it in /proc/self/status; elsewhere os.umask is the only way
    to read it, by setting it and back, which a file created by another thread in between would see."""
    try:
        with open(PROC_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # the strictest: what a racing thread's file gets for that moment
    os.umask(mask)
    return mask
