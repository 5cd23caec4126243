"""Data: class folders -> checked, decoded uint8 images -> augmented, normalised batches.

Each image is decoded once, upright and RGB, with its shorter side resized to `resize_size`
(torchvision's Resize(256) convention), and kept as a uint8 tensor. Augmentations then run on
those tensors: per image with transforms v2, or, for crops and flips of equal-sized images, on
the whole stacked batch at once. A sample's augmentation randomness is a pure function of
(seed, epoch, index), so worker count, caching and prefetching cannot change a run's bits.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Literal

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2
from tqdm import tqdm
from typing_extensions import assert_never

from imgcls import config as C
from imgcls import provenance, runtime
from imgcls.errors import DataError

# torchvision's ImageFolder extensions.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Decoders allowed to open a file: a restricted list keeps Ghostscript (EPS) and friends from ever running.
DECODERS = ["JPEG", "PNG", "BMP", "PPM", "TIFF", "WEBP", "GIF"]
JUNK_FILES = {"thumbs.db", "desktop.ini"}
# Transparent pixels are blended onto white, as a photo viewer shows them.
BACKGROUND = (255, 255, 255)
NORMALIZE = {"imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), "half": ([0.5] * 3, [0.5] * 3)}

assert not ImageFile.LOAD_TRUNCATED_IMAGES  # a truncated file must fail, never load half-grey


# ------------------------------------------------------------------------------------- scanning


@dataclass
class Split:
    """One split's files, labelled with train's class mapping."""

    name: str
    root: str
    paths: list[str]
    labels: list[int]
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    sizes: list[int] = field(default_factory=list)  # bytes of each file, once decoded
    sha256: list[str] = field(default_factory=list)
    phashes: list[int] = field(default_factory=list)  # perceptual hashes of the decoded images

    def relative_paths(self) -> list[str]:
        """Paths relative to the split's folder: what stays the same when the data moves."""
        return [os.path.relpath(p, self.root) for p in self.paths]


def scan_classes(root: str) -> list[str]:
    return C.class_folders(root)


def scan_split(name: str, root: str, classes: list[str]) -> Split:
    split = Split(name, root, [], [])
    here = scan_classes(root)
    unknown = [c for c in here if c not in classes]
    if unknown:
        raise DataError(
            f"{root}: class folder(s) {unknown} are not in the training set's classes {classes}; "
            "labels follow train's folders, so add them to train or remove them here"
        )
    for label, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        if not os.path.isdir(folder):
            continue
        others: Counter = Counter()
        files = image_files(folder, split.skipped, others)
        if not files:
            raise DataError(f"{folder}: class {cls!r} of the {name} split holds no images{unlisted(others)}")
        split.paths += files
        split.labels += [label] * len(files)
    return split


def image_files(folder: str, skipped: Counter, others: Counter | None = None) -> list[str]:
    """Image files below folder, sorted; symlinked folders are followed once and never out of folder.

    Files skipped for their extension are counted by extension in `others`."""
    top = os.path.realpath(folder)
    seen_dirs, seen_files, found = set(), set(), []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            skipped["linked folder seen before (a link loop or a second link)"] += 1
            continue
        if not (real == top or real.startswith(top + os.sep)):
            dirnames[:] = []
            skipped["linked folder outside the class folder"] += 1
            continue
        seen_dirs.add(real)
        # A folder named like an image (x.jpg/) is listed, not entered: decode reports it as a bad file.
        named_like_images = [d for d in dirnames if d.lower().endswith(IMAGE_EXTENSIONS) and not d.startswith(".")]
        dirnames[:] = sorted(d for d in dirnames if not C.is_hidden_dir(d) and d not in named_like_images)
        for fname in sorted(filenames + named_like_images):
            path = os.path.join(dirpath, fname)
            if fname.startswith(".") or fname.lower() in JUNK_FILES:
                skipped["hidden or system file"] += 1
            elif not fname.lower().endswith(IMAGE_EXTENSIONS):
                skipped["not an image extension"] += 1
                if others is not None:
                    others[os.path.splitext(fname)[1] or "no extension"] += 1
            elif os.path.realpath(path) in seen_files:
                skipped["duplicate link to the same file"] += 1
            else:
                seen_files.add(os.path.realpath(path))
                found.append(path)
    return found


def unlisted(others: Counter) -> str:
    """What a folder without images did hold, for its error message: files may be images under a name
    imgcls does not read (x.jfif, x.JPG2, a PNG with no extension), and an empty class is no answer."""
    if not others:
        return ""
    found = ", ".join(f"{n} {ext}" for ext, n in sorted(others.items(), key=lambda item: (-item[1], item[0])))
    return (
        f", only {sum(others.values())} file(s) with other extensions ({found}); imgcls reads "
        f"{' '.join(IMAGE_EXTENSIONS)} in any case: rename them if they are images"
    )


# ------------------------------------------------------------------------------------- decoding


def decode(path: str, resize_size: int) -> torch.Tensor:
    """Decode one file to an upright RGB uint8 tensor (3, H, W) whose shorter side is resize_size.

    Raises DataError naming the file for anything that is not a whole, readable image.
    """
    with _open_regular(path) as f:
        return _decode_file(f, path, resize_size)


@dataclass(frozen=True)
class Read:
    """One file as the preflight read it: its bytes' size and SHA-256, and the decoded image."""

    size: int
    sha256: str
    image: torch.Tensor


def read(path: str, resize_size: int) -> Read:
    """Read a file once, hash those bytes and decode them: what is recorded is what trains."""
    with _open_regular(path) as f:
        blob = f.read()
    return Read(len(blob), hashlib.sha256(blob).hexdigest(), _decode_file(io.BytesIO(blob), path, resize_size))


def _open_regular(path: str) -> BinaryIO:
    """Open a regular, non-empty file for reading, or raise DataError saying what it is instead.

    The type is checked on the open descriptor, not the name: O_NONBLOCK makes opening a named
    pipe return at once, so a pipe (or a file swapped for one) can never block the run.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        broken = os.path.islink(path)
        raise DataError(f"{path}: {'broken symbolic link' if broken else 'no such file'}") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder, not an image file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a pipe, socket or device"
        raise DataError(f"{path}: {kind}, not an image file")
    if info.st_size == 0:
        os.close(fd)
        raise DataError(f"{path}: empty file (0 bytes)")
    return os.fdopen(fd, "rb")


def _decode_file(f: BinaryIO, path: str, resize_size: int) -> torch.Tensor:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with warnings.catch_warnings():
                # PIL warns on the header's size, before draft mode can shrink a JPEG: a 100-megapixel
                # photo decodes at 1/8 scale, so the pixel count is checked below, after draft.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(f, formats=DECODERS)
            with img:
                # A camera's multi-picture JPEG (MPO) is a photo plus previews: its first frame is the photo.
                if getattr(img, "n_frames", 1) > 1 and img.format != "MPO":
                    raise DataError(f"{path}: animated or multi-page image ({img.n_frames} frames); save one frame")
                _check_shape(path, img.size, resize_size)
                img.draft("RGB", (resize_size, resize_size))  # JPEG: decode at a reduced scale when possible
                if img.size[0] * img.size[1] > Image.MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"{path}: refused, too many pixels ({img.size[0]}x{img.size[1]}, more than PIL's limit of "
                        f"{Image.MAX_IMAGE_PIXELS} for a {img.format} file); scale it down"
                    )
                img.load()
                ImageOps.exif_transpose(img, in_place=True)  # in place: a TIFF keeps the tags `to_rgb` reads
                img = to_rgb(img, path)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: refused, too many pixels ({e})") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"{path}: not an image in a supported format ({', '.join(DECODERS)})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from None
    # A (3, H, W) view of PIL's HWC bytes: channels-last strides are what torch's vectorised uint8
    # resize wants (0.19 ms for a 200x150 photo against PIL's 0.47 ms), and the contiguous copy
    # afterwards is the one HWC -> CHW copy the cache needs.
    image = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return _resize_shorter(image, resize_size).contiguous()


# The longest side an image may have, in multiples of its shorter one. Decoding resizes the shorter
# side to resize_size, so the cached image holds resize_size**2 * aspect pixels: without a limit a
# 258-byte 1x60000 PNG became 256 x 15 million pixels (8.4 GB). Past 10:1, evaluation's centre crop
# keeps under a tenth of the picture anyway; at 10:1 an image costs at most 10 * resize_size**2 * 3
# bytes (2 MB at 256).
MAX_ASPECT = 10


def _check_shape(path: str, size: tuple[int, int], resize_size: int) -> None:
    """Refuse, from the header's size alone, an image whose resized form would exceed MAX_ASPECT."""
    w, h = size
    new_h, new_w = resized_shape(h, w, resize_size)
    if max(new_h, new_w) > MAX_ASPECT * resize_size:
        raise DataError(
            f"{path}: refused, {w}x{h} pixels is longer than {MAX_ASPECT}:1; with its shorter side resized to "
            f"{resize_size} it would take {new_w}x{new_h} pixels ({3 * new_w * new_h / 1e9:.2g} GB). Crop it "
            f"to at most {MAX_ASPECT}:1"
        )


def to_rgb(img: Image.Image, path: str) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is blended onto BACKGROUND, 16-bit keeps its levels,
    32-bit integer and float greyscale are mapped by `levels`."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit greyscale: PIL's convert("L") clips at 255, so scale 0..65535 down to 0..255 instead.
        img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8), mode="L")
    elif img.mode in ("I", "F"):
        img = Image.fromarray(levels(_greyscale_values(img), path), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, BACKGROUND)
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")


def _greyscale_values(img: Image.Image) -> np.ndarray:
    """The values of a mode "I" or "F" image. PIL reads an unsigned 32-bit TIFF into its signed "I"
    mode, so values above 2**31 come out negative: such a file's bits are read back as unsigned."""
    values = np.asarray(img)
    tags = getattr(img, "tag_v2", {})
    if img.mode == "I" and img.format == "TIFF" and tags.get(258) in (32, (32,)) and tags.get(339, 1) in (1, (1,)):
        return values.astype(np.int32, copy=False).view(np.uint32)  # BitsPerSample 32, SampleFormat unsigned
    return values


def levels(values: np.ndarray, path: str) -> np.ndarray:
    """Greyscale values whose mode does not say their depth (32-bit integer or float) as 8-bit levels.

    The rule, read from the values: floats within [0, 1] are fractions of white; values within
    0..255 are 8-bit levels, within 0..65535 16-bit levels (as 16-bit files); a larger range is
    scaled so its largest value is white. Negative, NaN or infinite values have no such reading:
    the file is refused, never turned silently black or white.
    """
    if values.size == 0:
        return values.astype(np.uint8)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise DataError(f"{path}: float image holding NaN or infinite values; save it as an 8- or 16-bit image")
    low, high = values.min(), values.max()
    if low < 0:
        raise DataError(
            f"{path}: {values.dtype} image with negative values (down to {low}); imgcls reads greyscale as "
            "intensities from 0 up: save it as an 8- or 16-bit image"
        )
    # float32 arithmetic (4 bytes a pixel, as the values themselves) is exact enough for 8-bit levels.
    if values.dtype.kind == "f" and high <= 1:
        scaled = np.rint(values.astype(np.float32) * 255)
    elif high <= 255:
        scaled = np.rint(values) if values.dtype.kind == "f" else values
    elif high <= 65535:
        scaled = np.floor(values / np.float32(256)) if values.dtype.kind == "f" else values >> 8  # as 16-bit files
    else:
        scaled = np.rint(values.astype(np.float32) * np.float32(255 / float(high)))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(height, width) once the shorter side is size: what `_resize_shorter` makes, known from the header."""
    return (size, max(1, round(w * size / h))) if h <= w else (max(1, round(h * size / w)), size)


def _resize_shorter(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear with antialiasing (torchvision's Resize(size) on uint8), shorter side to size."""
    h, w = image.shape[-2:]
    if min(h, w) == size:
        return image
    return v2.functional.resize(image, list(resized_shape(h, w, size)), antialias=True)


# ------------------------------------------------------------------------------------ transforms


def build_augment(ops: list[C.Augment], image_size: int) -> v2.Compose:
    """The training pipeline: the experiment's ops in order, then a centre crop to image_size.

    The final crop is a no-op after a crop op and makes any other list end at the model's size.
    """
    transforms = [_augment_op(op, image_size) for op in ops]
    return v2.Compose([*transforms, v2.CenterCrop(image_size)])


def _augment_op(op: C.Augment, image_size: int) -> v2.Transform:
    match op:
        case C.RandomResizedCrop():
            return v2.RandomResizedCrop(image_size, scale=tuple(op.scale), ratio=tuple(op.ratio), antialias=True)
        case C.RandomCrop():
            return v2.RandomCrop(image_size, padding=op.padding or None, padding_mode=op.padding_mode, pad_if_needed=True)
        case C.Resize():
            return v2.Resize(op.size, antialias=True)
        case C.HorizontalFlip():
            return v2.RandomHorizontalFlip(op.p)
        case C.VerticalFlip():
            return v2.RandomVerticalFlip(op.p)
        case C.Rotation():
            return v2.RandomRotation(op.degrees)
        case C.ColorJitter():
            return v2.ColorJitter(op.brightness, op.contrast, op.saturation, op.hue)
        case C.Grayscale():
            return v2.RandomGrayscale(op.p)
        case C.GaussianBlur():
            return v2.GaussianBlur(op.kernel_size, sigma=tuple(op.sigma))
        case C.TrivialAugment():
            return v2.TrivialAugmentWide(num_magnitude_bins=op.num_magnitude_bins)
        case C.RandAugment():
            return v2.RandAugment(num_ops=op.num_ops, magnitude=op.magnitude)
        case C.RandomErasing():
            return v2.RandomErasing(op.p, scale=tuple(op.scale), ratio=tuple(op.ratio))
        case _:
            assert_never(op)


def eval_transform(image_size: int) -> v2.CenterCrop:
    """Deterministic: the decoded image (shorter side resize_size) centre-cropped to image_size."""
    return v2.CenterCrop(image_size)


# Ops a batch of equal-sized images can take at once. transforms v2 costs ~0.19 ms an image in
# Python dispatch for crop + flip at 28x28, a quarter of the scratch CNN's training step there;
# on a stacked batch the same ops are three tensor calls.
BATCHED_OPS = (C.RandomCrop, C.HorizontalFlip, C.VerticalFlip)


@dataclass(frozen=True)
class BatchAugment:
    """The augment list (then a centre crop to image_size) applied to a uint8 batch (N, 3, H, W).

    Each image's parameters are drawn by `sample_uniforms` from (seed, epoch, index), so a batch
    gives the same images whoever stacks it, and each image the same result in any batch.
    """

    ops: tuple[C.Augment, ...]
    image_size: int

    def __call__(self, images: torch.Tensor, seed: int, epoch: int, indices: list[int]) -> torch.Tensor:
        for position, op in enumerate(self.ops):
            u = [sample_uniforms(seed, epoch, indices, 1 + 2 * position + j) for j in range(2)]
            match op:
                case C.RandomCrop():
                    images = _random_crops(images, op, self.image_size, u[0], u[1])
                case C.HorizontalFlip():
                    images = _flip_where(images, u[0] < op.p, -1)
                case C.VerticalFlip():
                    images = _flip_where(images, u[0] < op.p, -2)
                case _:
                    raise AssertionError(f"{op.op} is not in BATCHED_OPS")
        return v2.functional.center_crop(images, [self.image_size, self.image_size])


def _random_crops(images: torch.Tensor, op: C.RandomCrop, size: int, u_top: torch.Tensor, u_left: torch.Tensor) -> torch.Tensor:
    """torchvision's RandomCrop(size, padding, pad_if_needed=True) with each image's own window."""
    if op.padding:
        images = v2.functional.pad(images, [op.padding], padding_mode=op.padding_mode)
    short_h, short_w = (max(size - n, 0) for n in images.shape[-2:])
    if short_h or short_w:  # pad_if_needed grows a short side by the shortfall at both ends, as torchvision
        images = v2.functional.pad(images, [short_w, short_h], padding_mode=op.padding_mode)
    h, w = images.shape[-2:]
    top = (u_top * (h - size + 1)).long()
    left = (u_left * (w - size + 1)).long()
    rows = (top[:, None] + torch.arange(size))[:, :, None]
    cols = (left[:, None] + torch.arange(size))[:, None, :]
    n = torch.arange(len(images))[:, None, None]
    # One gather over a channels-last view: (N, size, size, 3) windows, returned as (N, 3, size, size).
    return images.permute(0, 2, 3, 1)[n, rows, cols].permute(0, 3, 1, 2)


def _flip_where(images: torch.Tensor, flip: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(dim), images)


def split_transform(ops: list[C.Augment], image_size: int, images: list[torch.Tensor]) -> v2.Compose | BatchAugment:
    """Batched when every op allows it and all of the split's images have one size; else per image."""
    if all(isinstance(op, BATCHED_OPS) for op in ops) and len({tuple(im.shape) for im in images}) == 1:
        return BatchAugment(tuple(ops), image_size)
    return build_augment(ops, image_size)


def normalization(cfg: C.DataConfig) -> tuple[list[float], list[float]]:
    match cfg.normalize:
        case "imagenet" | "half":
            return NORMALIZE[cfg.normalize]
        case C.NormalizeStats():
            return cfg.normalize.mean, cfg.normalize.std
        case _:
            assert_never(cfg.normalize)


def inputs(exp: C.Experiment, device: torch.device) -> runtime.Inputs:
    """uint8 image batches -> normalised float batches on the device, under the experiment's precision."""
    mean, std = normalization(exp.data)
    return runtime.Inputs(Normalize(mean, std, exp.train.channels_last).to(device), device, exp.train.precision)


class Normalize(torch.nn.Module):
    """uint8 batch (N, 3, H, W) -> float batch scaled to [0, 1] then standardised per channel.

    Runs on whole batches on the model's device: one fused pass instead of per-image float copies.
    """

    def __init__(self, mean: list[float], std: list[float], channels_last: bool):
        super().__init__()
        self.register_buffer("scale", 1 / (255 * torch.tensor(std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", -(torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two passes over the batch instead of four: the layout change rides on the uint8 -> float
        # conversion, and scale and shift are one multiply-add.
        x = x.to(self.scale.device, non_blocking=True)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=self.memory_format)
        out.copy_(x)
        return torch.addcmul(self.shift, out, self.scale, out=out)


# ------------------------------------------------------------------------------ datasets, loaders


# splitmix64's increments and finaliser: every (seed, epoch, index, stream) gets its own well-mixed 64 bits.
_SEED, _EPOCH, _INDEX, _STREAM = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _keys(seed: int, epoch: int, indices: list[int], stream: int) -> np.ndarray:
    base = np.uint64((seed * _SEED + epoch * _EPOCH + stream * _STREAM) % 2**64)
    return _mix(base + np.asarray(indices, dtype=np.uint64) * np.uint64(_INDEX))  # uint64 arrays wrap mod 2**64


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed per (seed, epoch, index): seeds the per-image (transforms v2) path."""
    return int(_keys(seed, epoch, [index % 2**64], 0)[0]) >> 1


def sample_uniforms(seed: int, epoch: int, indices: list[int], stream: int) -> torch.Tensor:
    """One float64 in [0, 1) per index, a pure function of (seed, epoch, index, stream): the batched path's draws."""
    return torch.from_numpy((_keys(seed, epoch, indices, stream) >> np.uint64(11)).astype(np.float64) * 2.0**-53)


class ImageSet(Dataset):
    """Items are keyed by (epoch, key) so a sample's randomness never depends on who loads it.

    The key picks the randomness; key % len(self) picks the image (keys past the end are repeats
    of an image within an epoch, see EpochBatches).
    """

    def __init__(self, split: Split, images: list[torch.Tensor], transform: v2.Transform | BatchAugment, seed: int):
        self.split, self.images, self.transform, self.seed = split, images, transform, seed

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch (the DataLoader's batched fetch): one call of a BatchAugment, or per image."""
        if not isinstance(self.transform, BatchAugment):
            return [self[key] for key in keys]
        epochs, indices = zip(*keys)
        assert len(set(epochs)) == 1, "a batch comes from one epoch"
        images = [i % len(self) for i in indices]
        batch = self.transform(torch.stack([self.images[i] for i in images]), self.seed, epochs[0], list(indices))
        return list(zip(batch.unbind(0), [self.split.labels[i] for i in images]))

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        image = self.images[index % len(self)]
        if isinstance(self.transform, BatchAugment):
            return self.transform(image[None], self.seed, epoch, [index])[0], self.split.labels[index % len(self)]
        # Only the CPU generator (the one transforms v2 draw from) is seeded and restored:
        # torch.manual_seed also queues CUDA/XPU/MTIA seeding with a formatted stack trace each time,
        # which cost more than the augmentation itself.
        outer = torch.default_generator.get_state()
        try:
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            image = self.transform(image)
        finally:
            torch.default_generator.set_state(outer)
        return image, self.split.labels[index % len(self)]


class FeatureSet(Dataset):
    """Cached backbone features, keyed like ImageSet so the same sampler yields the same batches."""

    def __init__(self, features: torch.Tensor, split: Split):
        self.features, self.split = features, split

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index = key[1] % len(self)
        return self.features[index], self.split.labels[index]


# How a loader walks its split: val/test "in_order"; train by data.sampler.
Order = Literal["in_order", "shuffle", "balanced"]


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Batches of (epoch, key) pairs; which images come, and in which order, is a pure function of (seed, epoch).

    "in_order": every image once, in file order. "shuffle": every image once, permuted. "balanced": as
    many draws as images, with replacement, an image's chance 1 / its class's count, so every class is
    drawn equally often in expectation. The k-th draw of image i in an epoch has key i + k * n (the
    datasets read image key % n), so a repeated image gets augmentation draws of its own.
    A trailing batch of one is dropped unless in order: BatchNorm cannot train on a single image.
    """

    def __init__(self, labels: list[int], batch_size: int, order: Order, seed: int):
        self.labels, self.n, self.batch_size, self.order = labels, len(labels), batch_size, order
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _keys(self) -> list[int]:
        match self.order:
            case "in_order":
                return list(range(self.n))
            case "shuffle":
                g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
                return torch.randperm(self.n, generator=g).tolist()
            case "balanced":  # stream -2: never the same draws as the permutation of the same epoch
                return balanced_keys(self.labels, sample_seed(self.seed, self.epoch, -2))
            case _:
                assert_never(self.order)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        keys = self._keys()
        for start in range(0, self.n, self.batch_size):
            batch = keys[start : start + self.batch_size]
            if self.order != "in_order" and len(batch) == 1 and self.n > 1:
                return
            yield [(self.epoch, k) for k in batch]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest > 1 or (rest == 1 and (self.order == "in_order" or self.n == 1)))


def balanced_keys(labels: list[int], seed: int) -> list[int]:
    """len(labels) draws with replacement, each class equally likely, then uniform within the class;
    the k-th repeat of image i is key i + k * len(labels)."""
    n, label_tensor = len(labels), torch.tensor(labels, dtype=torch.long)
    chance = 1.0 / torch.bincount(label_tensor).double()[label_tensor]
    draws = torch.multinomial(chance, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    repeats: Counter[int] = Counter()
    keys = []
    for i in draws.tolist():
        keys.append(i + repeats[i] * n)
        repeats[i] += 1
    return keys


def class_counts(split: Split, classes: list[str]) -> dict[str, int]:
    """Images per class in label order: what "balanced" class weights are computed from."""
    counts = Counter(split.labels)
    return {name: counts[label] for label, name in enumerate(classes)}


def make_loader(
    dataset: ImageSet | FeatureSet, batch_size: int, order: Order, num_workers: int, seed: int
) -> DataLoader:
    if num_workers > 0:
        runtime.share_batches_by_file()
    return DataLoader(
        dataset,
        batch_sampler=EpochBatches(dataset.split.labels, batch_size, order, seed),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),  # seeds worker base seeds; augmentation ignores them
        persistent_workers=num_workers > 0,
        pin_memory=False,
    )


def build_loaders(exp: C.Experiment, dataset: Data) -> dict[str, DataLoader]:
    """One loader per split: train shuffled and augmented, val/test in file order, centre crop only."""
    loaders = {name: split_loader(exp, split, dataset.images[name]) for name, split in dataset.splits.items()}
    if len(loaders["train"]) == 0:  # a trailing batch of one is dropped (see EpochBatches)
        raise DataError(
            f"{len(dataset.splits['train'].paths)} training image(s) in batches of data.batch_size = "
            f"{exp.data.batch_size} give no optimizer step per epoch (a batch of one image is dropped: "
            "BatchNorm cannot train on it); add images or raise batch_size"
        )
    return loaders


def split_loader(exp: C.Experiment, split: Split, images: list[torch.Tensor]) -> DataLoader:
    is_train = split.name == "train"
    transform = split_transform(exp.augment if is_train else [], exp.data.image_size, images)
    batch = exp.data.batch_size if is_train else exp.data.eval_batch_size
    order = exp.data.sampler if is_train else "in_order"
    return make_loader(ImageSet(split, images, transform, exp.seed), batch, order, exp.data.num_workers, exp.seed)


def transform_paths(loaders: dict[str, DataLoader]) -> dict[str, str]:
    """Which path augments each split: it changes the bits (the two draw differently), so runs record it."""
    return {
        name: "batched" if isinstance(loader.dataset.transform, BatchAugment) else "per_image"
        for name, loader in loaders.items()
    }


# ------------------------------------------------------------------------------------- preflight


@dataclass
class Data:
    """Everything the run needs from the data section, checked before the first epoch."""

    classes: list[str]
    splits: dict[str, Split]
    images: dict[str, list[torch.Tensor]]
    report: dict


def prepare(cfg: C.DataConfig, progress: bool = True) -> Data:
    """Scan every split, decode every image once (the preflight), and report what was found.

    Bad images are all listed before epoch 1; with on_bad_image = "skip" they are left out.
    """
    classes = scan_classes(cfg.train_dir)
    if not classes:
        raise DataError(f"{cfg.train_dir}: no class folders (expected one sub-folder per class, as ImageFolder)")
    roots = {"train": cfg.train_dir, "val": cfg.val_dir, "test": cfg.test_dir}
    splits = {name: scan_split(name, root, classes) for name, root in roots.items() if root is not None}
    report: dict = {"classes": classes, "splits": {}, "warnings": []}
    images: dict[str, list[torch.Tensor]] = {}
    bad: list[str] = []
    for name, split in splits.items():
        decoded, failures = decode_split(split, cfg.resize_size, progress)
        bad += failures
        images[name] = decoded
        counts = Counter(classes[label] for label in split.labels)
        missing = [c for c in classes if counts[c] == 0]
        if missing and name != "train":
            report["warnings"].append(f"{name} split has no images of class(es) {missing}")
        report["splits"][name] = {
            "root": split.root,
            "images": len(split.paths),
            "per_class": {c: counts[c] for c in classes},
            "skipped_files": dict(split.skipped),
        }
    report["bad_images"] = bad
    if bad and cfg.on_bad_image == "fail":
        listing = "\n".join(f"  - {b}" for b in bad)
        raise DataError(
            f"{len(bad)} unreadable image(s):\n{listing}\n"
            'fix or remove them, or set data.on_bad_image = "skip" to leave them out'
        )
    _refuse_untrainable(splits["train"], classes, bool(bad))
    report["leakage"] = _leakage(splits)
    report["near_duplicates"], report["label_conflicts"] = _near_duplicates(splits, classes)
    _apply_policy(report, cfg)
    return Data(classes, splits, images, report)


def _apply_policy(report: dict, cfg: C.DataConfig) -> None:
    """Warn about copies across splits and photos under two classes, or fail, as the experiment says."""
    findings = [
        ("leakage", cfg.leakage, report["leakage"], "file(s) in train are byte-identical to files in val/test",
         lambda p: f"{p[0]} == {p[1]}"),
        ("leakage", cfg.leakage, report["near_duplicates"], "image(s) in val/test look like resized or re-encoded "
         "copies of training images", lambda p: f"{p['train']} ~ {p['other']} ({p['bits']} bits apart)"),
        ("label_conflicts", cfg.label_conflicts, report["label_conflicts"], "photo(s) appear under two classes",
         lambda p: f"{p['a']} ({p['class_a']}) ~ {p['b']} ({p['class_b']})"),
    ]
    for key, policy, found, what, show in findings:
        if not found:
            continue
        message = f"{len(found)} {what}"
        if policy == "fail":
            listing = "\n".join(f"  - {show(p)}" for p in found[:20])
            raise DataError(f"{message}:\n{listing}\nremove the copies, or set data.{key} = \"warn\"")
        report["warnings"].append(message)


def _refuse_untrainable(train: Split, classes: list[str], skipped: bool) -> None:
    """A classifier needs two classes, each with training images: anything less trains nothing."""
    if len(classes) < 2:
        raise DataError(
            f"{train.root}: only one class folder ({classes[0]!r}); a classifier needs at least two classes"
        )
    empty = [c for i, c in enumerate(classes) if i not in set(train.labels)]
    if empty:
        why = " after unreadable images were left out" if skipped else ""
        raise DataError(f"{train.root}: class(es) {empty} have no training images{why}; the model could never predict them")


def decode_split(split: Split, resize_size: int, progress: bool) -> tuple[list[torch.Tensor], list[str]]:
    """Read and decode every file of a split once; the split keeps the readable ones, with the size
    and SHA-256 of the bytes that were decoded. Returns the images and the unreadable files' errors."""
    kept: list[tuple[str, int, Read]] = []
    failures = []
    bar = tqdm(split.paths, desc=f"decode {split.name}", unit="img", disable=not progress, leave=False)
    for path, label in zip(bar, split.labels):
        try:
            kept.append((path, label, read(path, resize_size)))
        except DataError as e:
            failures.append(str(e))
    split.paths = [path for path, _, _ in kept]
    split.labels = [label for _, label, _ in kept]
    split.sizes = [r.size for _, _, r in kept]
    split.sha256 = [r.sha256 for _, _, r in kept]
    split.phashes = [provenance.perceptual_hash(r.image) for _, _, r in kept]
    if not split.paths:
        raise DataError(f"{split.root}: no readable images in the {split.name} split")
    return [r.image for _, _, r in kept], failures


def _near_duplicates(splits: dict[str, Split], classes: list[str]) -> tuple[list[dict], list[dict]]:
    """Pairs of images within provenance.NEAR_DUPLICATE_BITS of each other, compared against train:
    a copy in val/test that is not byte-identical (leakage), and one photo under two classes
    (a conflict, within train or across splits)."""
    train, leaks, conflicts = splits["train"], [], []
    for name, split in splits.items():
        for i, j, bits in provenance.near_duplicates(train.phashes, split.phashes, provenance.NEAR_DUPLICATE_BITS):
            if name == "train" and i >= j:
                continue  # each pair once, and never an image with itself
            if train.labels[i] != split.labels[j]:
                conflicts.append({"a": train.paths[i], "class_a": classes[train.labels[i]], "b": split.paths[j],
                                  "class_b": classes[split.labels[j]], "bits": bits})
            elif name != "train" and train.sha256[i] != split.sha256[j]:
                leaks.append({"train": train.paths[i], "other": split.paths[j], "bits": bits})
    return leaks, conflicts


def _leakage(splits: dict[str, Split]) -> list[tuple[str, str]]:
    if "train" not in splits:
        return []
    train = dict(zip(splits["train"].sha256, splits["train"].paths))
    return [
        (train[h], p)
        for name, split in splits.items()
        if name != "train"
        for p, h in zip(split.paths, split.sha256)
        if h in train
    ]
