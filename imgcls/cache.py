"""Cache: each split's decoded images in one file on disk, built once, then shared and reused.

Decoding is the preflight's cost (a 100k-image folder took minutes before every epoch 1, every
resume, every `evaluate`), and holding the decoded images in RAM capped a data set at what memory
held. A split's decoded images now live in one file under `data.cache_dir`, named by everything
its pixels are a function of: the SHA-256 of every readable file in the split's order, the
resize size and the decoder's identity (`decoding.py`'s source and the PIL, torch and torchvision
versions). A second run, a resume or `evaluate` over the same bytes reads each file once to hash
it and decodes nothing.

Images are read back with `os.preadv` (one call per image, or per run of images stored back to
back), not memory-mapped: mapped pages count in the process's RSS once touched, so a mapping would
grow with the data set, while the page cache that `preadv` goes through is shared by all workers
and processes of the machine and given back under memory pressure.

File layout: the pixels of each image (uint8, (H, W, 3): channels interleaved), back to back, then
a JSON index (each entry's (3, H, W) shape, offset and perceptual hash, or the reason it could not
be decoded; the SHA-256 of the pixel bytes), then FOOTER: the index's length and MAGIC. A file is
written under a temporary name and renamed, so a reader never sees half of one and two builders of
the same cache cannot corrupt it; a damaged file (any byte) fails the pixel digest and is rebuilt,
never read as pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import struct
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import PIL
import torch
import torchvision
from tqdm import tqdm

from imgcls import decoding, provenance
from imgcls.checkpoint import current_umask
from imgcls.errors import DataError

# 2: pixels stored (H, W, 3). A batch of their crops stacks straight into the channels_last layout
# the networks run in, and torch's uint8 antialiased resize runs faster on them (bench.layout).
FORMAT = 2
MAGIC = b"imgcls-decoded-1"
FOOTER = struct.Struct("<Q16s")  # index length, MAGIC
# Below this many images a process pool costs more than it saves: each worker imports torch (~1 s).
POOL_MIN_IMAGES = 256
PATH = "\0"  # stands for the file's path in a cached error message; no POSIX path holds a NUL
CHUNK = 16  # images per task sent to a worker: amortises pickling without starving the last worker


@dataclass(frozen=True)
class Hashed:
    """A file's bytes as read for the split's identity: their size and SHA-256."""

    size: int
    sha256: str


# Files a hashing task takes: one task per file cost more pool bookkeeping than hashing a 1 KB PNG.
HASH_CHUNK = 64


def hash_files(paths: Sequence[str], workers: int, progress: bool, desc: str) -> list[Hashed | str]:
    """Size and SHA-256 of every file, or the reason it cannot be read (an error message).

    Threads, not processes: hashing is reading, and hashlib releases the GIL on large buffers.
    """
    found: list[Hashed | str] = []
    chunks = [paths[i : i + HASH_CHUNK] for i in range(0, len(paths), HASH_CHUNK)]
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for hashed in pool.map(_hash_some, chunks):
            found += hashed
            bar.update(len(hashed))
    return found


def _hash_some(paths: Sequence[str]) -> list[Hashed | str]:
    return [_hash_one(path) for path in paths]


def _hash_one(path: str) -> Hashed | str:
    try:
        with decoding.open_regular(path) as f:
            blob = f.read()
    except DataError as e:
        return str(e)
    return Hashed(len(blob), hashlib.sha256(blob).hexdigest())


def decoder_identity() -> str:
    """What decoded pixels depend on besides the file's bytes: change any of it and caches miss."""
    source = Path(decoding.__file__).read_bytes()
    versions = f"{PIL.__version__} {torch.__version__} {torchvision.__version__} {FORMAT}"
    return hashlib.sha256(source + versions.encode()).hexdigest()


def key(sha256s: Iterable[str], resize_size: int) -> str:
    """The cache file's name: a digest of the split's file digests in order, the size and the decoder."""
    h = hashlib.sha256(f"{decoder_identity()} {resize_size}\n".encode())
    for digest in sha256s:
        h.update(digest.encode() + b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- reading


class Decoded(Sequence[torch.Tensor]):
    """A split's decoded images, read from the cache file on demand: image i is a fresh (3, H, W)
    uint8 tensor, a view of its pixels as stored, (H, W, 3). Pickles as its path and index, so loader
    workers (fork or spawn) open the file themselves instead of receiving the pixels."""

    def __init__(self, path: str, entries: list[dict]):
        self.path, self.entries = path, entries
        self._fd: int | None = None
        self._pid = -1

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(e["shape"]) for e in self.entries]

    @property
    def phashes(self) -> list[int]:
        return [e["phash"] for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        return self.take([i])[0]

    def take(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The images at indices, in that order. Images stored back to back (a sequential loader's
        batch: evaluation's) are read by one call into one buffer, each image a view of it."""
        entries = [self.entries[i] for i in indices]
        ends = [e["offset"] + math.prod(e["shape"]) for e in entries]
        runs: list[list[int]] = []  # positions in indices whose images follow each other in the file
        for k, entry in enumerate(entries):
            if runs and ends[runs[-1][-1]] == entry["offset"]:
                runs[-1].append(k)
            else:
                runs.append([k])
        images: list[torch.Tensor] = [torch.empty(0)] * len(indices)
        for run in runs:
            start = entries[run[0]]["offset"]
            buffer = torch.empty(ends[run[-1]] - start, dtype=torch.uint8)
            if os.preadv(self._descriptor(), [buffer.numpy()], start) != len(buffer):
                # the file was cut after it was checked
                raise DataError(f"{self.path}: decoded cache file is shorter than its index; delete it and run again")
            for k in run:
                channels, height, width = entries[k]["shape"]
                pixels = buffer[entries[k]["offset"] - start : ends[k] - start]
                images[k] = pixels.view(height, width, channels).permute(2, 0, 1)  # (3, H, W), channels_last strides
        return images

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), os.getpid()
        return self._fd

    def __getstate__(self) -> dict:
        return {"path": self.path, "entries": self.entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["entries"])

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


def load(path: Path, expected_key: str, n: int) -> tuple[Decoded, list[dict]] | str:
    """The cache file at path, checked whole (footer, index, size, pixel digest); else why not."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < FOOTER.size:
                return "shorter than its footer"
            f.seek(size - FOOTER.size)
            length, magic = FOOTER.unpack(f.read(FOOTER.size))
            if magic != MAGIC or length > size - FOOTER.size:
                return "no imgcls footer"
            f.seek(size - FOOTER.size - length)
            index = json.loads(f.read(length))
            pixels = size - FOOTER.size - length
            if index.get("key") != expected_key or len(index.get("entries", ())) != n or index.get("pixels") != pixels:
                return "index does not match its name or size"
            f.seek(0)
            digest = hashlib.file_digest(_Limited(f, pixels), "sha256").hexdigest()
    except FileNotFoundError:
        return "absent"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable ({e})"
    if digest != index["pixels_sha256"]:
        return "pixel digest differs (damaged)"
    images = [e for e in index["entries"] if "error" not in e]
    return Decoded(str(path), images), index["entries"]


class _Limited:
    """The first `left` bytes of a binary file, for hashlib.file_digest."""

    def __init__(self, f, left: int):
        self.f, self.left = f, left

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)[: self.left]
        n = self.f.readinto(view)
        self.left -= n
        return n

    def readable(self) -> bool:
        return True


# ---------------------------------------------------------------------------------------- building


def build(path: Path, expected_key: str, paths: list[str], sha256s: list[str], resize_size: int,
          workers: int, progress: bool, desc: str) -> None:
    """Decode every file into a new cache file at path (written aside, then renamed into place).

    Results come back in file order whatever the pool size, so the bytes of the file are too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    entries, offset, digest = [], 0, hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            results = _decoded(list(zip(paths, sha256s)), resize_size, workers)
            bar = tqdm(results, total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
            for result in bar:
                if isinstance(result, str):
                    entries.append({"error": result})
                    continue
                blob, shape, phash = result
                out.write(blob)
                digest.update(blob)
                entries.append({"shape": shape, "offset": offset, "phash": phash})
                offset += len(blob)
            index = {"format": FORMAT, "key": expected_key, "pixels": offset,
                     "pixels_sha256": digest.hexdigest(), "entries": entries}
            encoded = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
            out.write(encoded + FOOTER.pack(len(encoded), MAGIC))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # as any result file: what the umask gives
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _decoded(jobs: list[tuple[str, str]], resize_size: int, workers: int) -> Iterator[tuple | str]:
    """(pixels, shape, perceptual hash) or an error message per job, in order."""
    if workers <= 1 or len(jobs) < POOL_MIN_IMAGES:
        yield from (_decode_one(job, resize_size) for job in jobs)
        return
    # The platform's default start method, as DataLoader workers use: fork on Linux (torch resets
    # its thread pools in a forked child); spawn elsewhere, where a script that runs imgcls needs
    # the usual `if __name__ == "__main__":` guard, as for DataLoader workers.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(), initializer=_one_thread) as pool:
        yield from pool.map(_decode_one, jobs, [resize_size] * len(jobs), chunksize=CHUNK)


def _one_thread() -> None:
    """A pool worker decodes in one thread: the pool is the parallelism. (Never in the main process:
    its thread count is part of what a run's bits depend on.)"""
    torch.set_num_threads(1)


def _decode_one(job: tuple[str, str], resize_size: int) -> tuple[bytes, list[int], int] | str:
    """Read a file once, check its bytes are those hashed, decode them. An error message names the file as PATH, which the reader puts back: the cache is
    keyed by content, and the same bytes may sit elsewhere next time."""
    path, expected = job
    try:
        read = decoding.read(path, resize_size)
        if read.sha256 != expected:
            raise DataError(f"{path}: changed while imgcls read it (its SHA-256 differs between two reads); run again")
    except DataError as e:
        return str(e).replace(path, PATH)
    image = read.image
    pixels = image.permute(1, 2, 0).contiguous()  # FORMAT's (H, W, 3)
    return pixels.numpy().tobytes(), list(image.shape), provenance.perceptual_hash(image)


# ------------------------------------------------------------------------------------------- a split


@dataclass
class Cached:
    """What the preflight needs of one split: each readable file's digest, its decoded image
    (from the cache) and perceptual hash, and the files that could not be used, with why."""

    kept: list[int]  # indices into the split's paths
    sizes: list[int]
    sha256: list[str]
    images: Decoded
    failures: list[str]
    hit: bool


def decoded_split(paths: list[str], resize_size: int, cache_dir: str, workers: int, progress: bool, name: str) -> Cached:
    """Hash every file, then reuse the split's cache file or build it: decode each image once."""
    hashed = hash_files(paths, workers, progress, f"hash {name}")
    readable = [i for i, h in enumerate(hashed) if isinstance(h, Hashed)]
    sha256s = [hashed[i].sha256 for i in readable]
    name_key = key(sha256s, resize_size)
    path = Path(cache_dir) / f"{name_key}.decoded"
    loaded = load(path, name_key, len(readable))
    hit = not isinstance(loaded, str)
    if not hit:
        if loaded != "absent":
            print(f"decoded cache {path}: {loaded}; rebuilding it", file=sys.stderr)
        build(path, name_key, [paths[i] for i in readable], sha256s, resize_size, workers, progress, f"decode {name}")
        loaded = load(path, name_key, len(readable))
        if isinstance(loaded, str):
            raise DataError(f"{path}: the decoded cache just written does not read back ({loaded}); check the disk")
    if progress:
        print(f"{name}: decoded cache {'reused' if hit else 'built'} ({path})", file=sys.stderr)
    images, entries = loaded
    errors = {i: h for i, h in enumerate(hashed) if isinstance(h, str)}
    errors |= {i: e["error"].replace(PATH, paths[i]) for i, e in zip(readable, entries) if "error" in e}
    kept = [i for i in readable if i not in errors]
    failures = [errors[i] for i in sorted(errors)]  # in file order, as the preflight lists them
    return Cached(kept, [hashed[i].size for i in kept], [hashed[i].sha256 for i in kept], images, failures, hit)


def workers_for(setting: int | str) -> int:
    """data.decode_workers: a number, or "auto" for the CPUs this process may use."""
    if setting == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(setting)
