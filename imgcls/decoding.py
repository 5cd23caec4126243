"""Decoding: one image file -> an upright RGB uint8 tensor (3, H, W), shorter side resize_size.

The one decoder of imgcls: the preflight, the decoded cache, `evaluate` and `predict` all read
images through `read`/`decode`, so a photo is the same pixels wherever it is used. Anything that
is not a whole, readable image is a DataError naming the file; memory per image is bounded from
the file's header before its pixels are read.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms import v2

from imgcls.errors import DataError

# Decoders allowed to open a file: a restricted list keeps Ghostscript (EPS) and friends from ever running.
DECODERS = ["JPEG", "PNG", "BMP", "PPM", "TIFF", "WEBP", "GIF"]
# Transparent pixels are blended onto white, as a photo viewer shows them.
BACKGROUND = (255, 255, 255)

assert not ImageFile.LOAD_TRUNCATED_IMAGES  # a truncated file must fail, never load half-grey


def decode(path: str, resize_size: int) -> torch.Tensor:
    """Decode one file to an upright RGB uint8 tensor (3, H, W) whose shorter side is resize_size,
    its pixels in (H, W, 3) memory (channels_last, as the decoded cache stores them).

    Raises DataError naming the file for anything that is not a whole, readable image.
    """
    with open_regular(path) as f:
        return _decode_file(f, path, resize_size)


@dataclass(frozen=True)
class Read:
    """One file as the preflight read it: its bytes' size and SHA-256, and the decoded image."""

    size: int
    sha256: str
    image: torch.Tensor


def read(path: str, resize_size: int) -> Read:
    """Read a file once, hash those bytes and decode them: what is recorded is what trains."""
    with open_regular(path) as f:
        blob = f.read()
    return Read(len(blob), hashlib.sha256(blob).hexdigest(), _decode_file(io.BytesIO(blob), path, resize_size))


def open_regular(path: str) -> BinaryIO:
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
    # resize wants (0.19 ms for a 200x150 photo against PIL's 0.47 ms), and it answers in them, so
    # the image is already in the decoded cache's (H, W, 3) layout: no copy.
    image = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return _resize_shorter(image, resize_size)


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
