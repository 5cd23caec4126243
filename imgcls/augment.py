"""Augmentation: the experiment's augment list, turned into what happens to each training image.

Every sample's randomness is a pure function of (seed, epoch, index), so neither worker count,
batch, caching nor device can change a run's bits. Two kinds of ops:

- Keyed ops (random_resized_crop, random_crop, flips, then the centre crop every list ends with)
  draw their parameters from `sample_uniforms` and become a `Plan` of pads, crops, flips and at
  most a resize per image. A plan has two forms that give the same pixels: per image (slices,
  pads, flips and torch's uint8 antialiased resize: cheapest on CPU cores, in loader workers),
  and batched (each axis of a plan folded into one integer weight matrix that reproduces torch's
  uint8 resize exactly, applied to a padded stack by two float64 matmuls: cheapest on a GPU).
- Any other op (color_jitter, rotation, ...) runs through transforms v2 image by image, with the
  CPU generator seeded by `sample_seed`; a list holding one runs wholly that way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms import v2
from typing_extensions import assert_never

from imgcls import config as C

# ------------------------------------------------------------------------------------ random keys

# splitmix64's increments and finaliser: every (seed, epoch, index, stream) gets its own well-mixed 64 bits.
_SEED, _EPOCH, _INDEX, _STREAM = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _keys(seed: int, epoch: int, indices: list[int], stream: int | Sequence[int]) -> np.ndarray:
    """One key per index (for a sequence of streams, one row per stream)."""
    one = isinstance(stream, int)
    base = np.array([(seed * _SEED + epoch * _EPOCH + s * _STREAM) % 2**64 for s in ([stream] if one else stream)], dtype=np.uint64)
    keys = _mix(base[:, None] + np.asarray(indices, dtype=np.uint64) * np.uint64(_INDEX))  # uint64 arrays wrap mod 2**64
    return keys[0] if one else keys


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed per (seed, epoch, index): seeds the per-image (transforms v2) path."""
    return int(_keys(seed, epoch, [index % 2**64], 0)[0]) >> 1


def sample_uniforms(seed: int, epoch: int, indices: list[int], stream: int | Sequence[int]) -> torch.Tensor:
    """One float64 in [0, 1) per index, a pure function of (seed, epoch, index, stream): the keyed ops'
    draws. Given a sequence of streams, one row per stream, each equal to that stream's draws alone."""
    return torch.from_numpy((_keys(seed, epoch, indices, stream) >> np.uint64(11)).astype(np.float64) * 2.0**-53)




# ---------------------------------------------------------------------------- transforms v2 path


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


# ------------------------------------------------------------------------------------ keyed plans

# The ops with a keyed form, and how many uniforms each draws per image. transforms v2 costs ~0.19 ms
# an image in Python dispatch and generator seeding for crop + flip at 28x28, a quarter of the
# scratch CNN's training step there. Op `position` of a list draws from streams
# 1 + DRAWS_PER_OP * position + j; random_resized_crop takes 10 tries of 4 draws.
DRAWS_PER_OP, RESIZED_CROP_TRIES = 64, 10
DRAWS = {C.RandomResizedCrop: 4 * RESIZED_CROP_TRIES, C.RandomCrop: 2, C.HorizontalFlip: 1, C.VerticalFlip: 1}
KEYED_OPS = tuple(DRAWS)


@dataclass(frozen=True)
class Pad:
    top: int
    bottom: int
    left: int
    right: int
    mode: str  # torchvision's padding_mode


@dataclass(frozen=True)
class Crop:
    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class Flip:
    dim: int  # -1 left-right, -2 upside down


@dataclass(frozen=True)
class Resize:
    height: int
    width: int


Step = Pad | Crop | Flip | Resize
Plan = list[Step]


def plan(ops: Sequence[C.Augment], image_size: int, height: int, width: int, draws: Sequence[Sequence[float]]) -> Plan:
    """One image's keyed ops as steps, `draws[position]` holding op `position`'s uniforms.

    Each op is torchvision's (RandomResizedCrop, RandomCrop with pad_if_needed, RandomXFlip, then
    CenterCrop) with its random numbers taken from the draws instead of torch's generator.
    """
    steps: Plan = []
    h, w = height, width
    for op, u in zip(ops, draws):
        match op:
            case C.RandomResizedCrop():
                top, left, ch, cw = resized_crop_box(op, h, w, u)
                steps += [Crop(top, left, ch, cw), Resize(image_size, image_size)]
                h = w = image_size
            case C.RandomCrop():
                steps += _random_crop(op, image_size, h, w, u)
                h = w = image_size
            case C.HorizontalFlip():
                steps += [Flip(-1)] if u[0] < op.p else []
            case C.VerticalFlip():
                steps += [Flip(-2)] if u[0] < op.p else []
            case _:
                raise AssertionError(f"{op.op} has no keyed form")
    return steps + _center_crop(image_size, h, w)


def resized_crop_box(op: C.RandomResizedCrop, height: int, width: int, u: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, height, width): up to 10 tries at an area and
    log-uniform aspect ratio that fit, else the centre crop at the nearest allowed ratio."""
    area, log_ratio = height * width, (math.log(op.ratio[0]), math.log(op.ratio[1]))
    for t in range(RESIZED_CROP_TRIES):
        u_area, u_ratio, u_top, u_left = u[4 * t : 4 * t + 4]
        target = area * (op.scale[0] + u_area * (op.scale[1] - op.scale[0]))
        aspect = math.exp(log_ratio[0] + u_ratio * (log_ratio[1] - log_ratio[0]))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(op.ratio):
        w, h = width, round(width / min(op.ratio))
    elif in_ratio > max(op.ratio):
        h, w = height, round(height * max(op.ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _random_crop(op: C.RandomCrop, size: int, h: int, w: int, u: Sequence[float]) -> Plan:
    """RandomCrop(size, padding, pad_if_needed=True): pad by `padding`, then a side still short by
    the shortfall at both ends (a second pad, as torchvision), then a uniform window."""
    steps: Plan = []
    if op.padding:
        steps.append(Pad(op.padding, op.padding, op.padding, op.padding, op.padding_mode))
        h, w = h + 2 * op.padding, w + 2 * op.padding
    short_h, short_w = max(size - h, 0), max(size - w, 0)
    if short_h or short_w:
        steps.append(Pad(short_h, short_h, short_w, short_w, op.padding_mode))
        h, w = h + 2 * short_h, w + 2 * short_w
    return steps + [Crop(int(u[0] * (h - size + 1)), int(u[1] * (w - size + 1)), size, size)]


def _center_crop(size: int, h: int, w: int) -> Plan:
    """v2.functional.center_crop: zero-pad a short side ((d // 2, (d + 1) // 2)), then the centre window."""
    steps: Plan = []
    if h < size or w < size:
        dh, dw = max(size - h, 0), max(size - w, 0)
        steps.append(Pad(dh // 2, (dh + 1) // 2, dw // 2, (dw + 1) // 2, "constant"))
        h, w = h + dh, w + dw
    if (h, w) != (size, size):
        steps.append(Crop(int(round((h - size) / 2.0)), int(round((w - size) / 2.0)), size, size))
    return steps


def draws_for(ops: Sequence[C.Augment], seed: int, epoch: int, indices: list[int]) -> list[list[list[float]]]:
    """draws[i][position]: image i's uniforms for op `position`, drawn for the whole batch at once."""
    per_op = [  # (images, draws) lists, all of an op's streams computed at once
        sample_uniforms(seed, epoch, indices, [1 + DRAWS_PER_OP * position + j for j in range(DRAWS[type(op)])]).T.tolist()
        for position, op in enumerate(ops)
    ]
    return [[d[i] for d in per_op] for i in range(len(indices))]


def _pad(image: torch.Tensor, step: Pad) -> torch.Tensor:
    """torchvision's pad of a (3, H, W) image. Zeros are padded on the (H, W, 3) memory the cache
    keeps: torchvision pads in (3, H, W) memory, which from interleaved pixels is a transposing copy
    (~4x slower at 256 px, bench.layout). Its other modes measured 1.0-1.3x slower from interleaved
    memory, and are left to it."""
    if step.mode == "constant":
        pad = [0, 0, step.left, step.right, step.top, step.bottom]
        return torch.nn.functional.pad(image.permute(1, 2, 0), pad).permute(2, 0, 1)
    return v2.functional.pad(image, [step.left, step.top, step.right, step.bottom], padding_mode=step.mode)


def render(image: torch.Tensor, steps: Plan) -> torch.Tensor:
    """A plan carried out on one uint8 image (3, H, W): the per-image form."""
    k = 0
    while k < len(steps):
        match step := steps[k]:
            case Pad():
                window = steps[k + 1] if k + 1 < len(steps) else None
                if isinstance(window, Crop) and _inside(window, step, image.shape[-2:]):
                    # The window misses the padding: slice it from the image itself. (Padding copies
                    # the whole image; at 224 pixels that cost 3x the crop.)
                    top, left = window.top - step.top, window.left - step.left
                    image = image[:, top : top + window.height, left : left + window.width]
                    k += 2
                    continue
                image = _pad(image, step)
            case Crop():
                image = image[:, step.top : step.top + step.height, step.left : step.left + step.width]
            case Flip():
                # Flipped as (H, W, 3): a flipped crop of the cache's pixels stays in their layout
                # (flipped as (3, H, W), it would land in planar memory for the batch to transpose).
                image = image.permute(1, 2, 0).flip(step.dim - 1).permute(2, 0, 1)
            case Resize():
                # A dense channels_last copy of the crop: torch's uint8 resize has its fast path for
                # that (1.4-1.6x a (3, H, W) crop's, copy included; bench.layout) and answers in
                # channels_last, which the batch takes as a plain copy.
                dense = image[None].contiguous(memory_format=torch.channels_last)
                image = v2.functional.resize(dense, [step.height, step.width], antialias=True)[0]
            case _:
                assert_never(step)
        k += 1
    return image


def _inside(crop: Crop, pad: Pad, shape: Sequence[int]) -> bool:
    h, w = shape
    return pad.top <= crop.top <= pad.top + h - crop.height and pad.left <= crop.left <= pad.left + w - crop.width


# --------------------------------------------------------------------------------- batched form


def resize_weights(n_in: int, n_out: int) -> tuple[np.ndarray, int]:
    """torch's uint8 antialiased bilinear resize along one axis as integers: (n_out x n_in) weights
    and the shift, so out = clamp((sum(w * x) + 2**(shift - 1)) >> shift, 0, 255) exactly.

    The weights are the triangle filter widened by the downscale factor, normalised per output
    pixel and rounded to int16 at the most precision bits (at most 22) that keep the largest below
    2**15, all in float64, as ATen's `_compute_index_ranges_int16_weights` computes them.
    """
    scale = n_in / n_out
    support, invscale = (scale, 1 / scale) if scale >= 1 else (1.0, 1.0)
    center = scale * (np.arange(n_out) + 0.5)
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in) - first
    taps = first[:, None] + np.arange(int(count.max()))
    w = np.maximum(0.0, 1.0 - np.abs((taps - center[:, None] + 0.5) * invscale))
    w[np.arange(w.shape[1]) >= count[:, None]] = 0.0
    total = w[:, 0].copy()
    for j in range(1, w.shape[1]):  # in tap order, as the C++ loop adds them
        total += w[:, j]
    w = np.where(total[:, None] != 0, w / np.where(total == 0, 1.0, total)[:, None], w)
    shift = 0
    while shift < 22 and int(0.5 + w.max() * (1 << (shift + 1))) < 1 << 15:
        shift += 1
    dense = np.zeros((n_out, n_in), dtype=np.int64)
    rows = np.broadcast_to(np.arange(n_out)[:, None], taps.shape)
    valid = taps < n_in
    dense[rows[valid], taps[valid]] = np.floor(w[valid] * (1 << shift) + 0.5).astype(np.int64)
    return dense, shift


class Unbatchable(ValueError):
    """A plan with two resizes: the batched form folds at most one rounding per axis."""


def axis_weights(steps: Plan, n: int, dim: int) -> tuple[np.ndarray, int]:
    """One axis of a plan (dim -2 rows, -1 columns) as (n_out x n) integer weights over the original
    image's pixels and the resize's shift (0: every output pixel is a copy of one input pixel, or 0)."""
    m, shift, resized = np.eye(n, dtype=np.int64), 0, False
    for step in steps:
        match step:
            case Pad():
                before, after = (step.top, step.bottom) if dim == -2 else (step.left, step.right)
                m = np.concatenate([m, np.zeros((1, n), np.int64)])[_pad_index(len(m), before, after, step.mode)]
            case Crop():
                start, length = (step.top, step.height) if dim == -2 else (step.left, step.width)
                m = m[start : start + length]
            case Flip():
                m = m[::-1] if step.dim == dim else m
            case Resize():
                out = step.height if dim == -2 else step.width
                if out != len(m):  # torch resizes only the axes whose size changes
                    if resized:
                        raise Unbatchable("two resizes in one plan")
                    weights, shift = resize_weights(len(m), out)
                    m, resized = weights @ m, True
            case _:
                assert_never(step)
    return m, shift


def _pad_index(n: int, before: int, after: int, mode: str) -> np.ndarray:
    """For each position of the padded axis, the position it copies (n: the appended zero row)."""
    q = np.arange(-before, n + after)
    match mode:
        case "constant":
            return np.where((q < 0) | (q >= n), n, q)
        case "edge":
            return np.clip(q, 0, n - 1)
        case "reflect":
            q = np.abs(q)
            return np.where(q > n - 1, 2 * (n - 1) - q, q)
        case "symmetric":
            q = np.where(q < 0, -q - 1, q)
            return np.where(q > n - 1, 2 * n - 1 - q, q)
        case _:
            raise AssertionError(f"padding_mode {mode!r}")


def _compact(dense: list[np.ndarray], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (n_out x n_i) weights as (index, weight) tables (N, n_out, K) of the nonzero taps."""
    k = max(1, max(int((m != 0).sum(1).max(initial=0)) for m in dense))
    index = np.zeros((len(dense), dense[0].shape[0], k), np.int64)
    weight = np.zeros_like(index)
    for i, m in enumerate(dense):
        order = np.argsort(m == 0, axis=1, kind="stable")[:, :k]  # nonzero taps first
        index[i], weight[i] = order, np.take_along_axis(m, order, 1)
    assert index.max(initial=0) < width
    return torch.from_numpy(index), torch.from_numpy(weight)


@dataclass
class Planned:
    """A batch whose keyed ops are yet to be applied, where the batch is going: the images zero-padded
    to one (N, 3, H, W) uint8 stack, and per image and axis the nonzero integer weights and the shift."""

    pixels: torch.Tensor
    rows: tuple[torch.Tensor, torch.Tensor]
    cols: tuple[torch.Tensor, torch.Tensor]
    shifts: torch.Tensor  # (N, 2): rows', columns'

    def __len__(self) -> int:
        return len(self.pixels)

    def pin_memory(self) -> Planned:  # the DataLoader's pin_memory calls this
        return Planned(self.pixels.pin_memory(), self.rows, self.cols, self.shifts)

    def render(self, device: torch.device) -> torch.Tensor:
        """(N, 3, S, S) uint8, equal to the per-image form. Every product and sum is an integer
        below 2**31, so float64 matmuls (any order, any device) are exact; float32 would not be."""
        x = self.pixels.to(device, non_blocking=True).double()
        n, _, height, width = x.shape
        cols, rows = _dense(self.cols, width, device), _dense(self.rows, height, device)
        shifts = self.shifts.to(device).double()
        x = _rounded(x @ cols.transpose(1, 2).unsqueeze(1), shifts[:, 1])  # columns first, as torch's resize
        return _rounded(rows.unsqueeze(1) @ x, shifts[:, 0]).to(torch.uint8)


def _dense(table: tuple[torch.Tensor, torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    index, weight = (t.to(device, non_blocking=True) for t in table)
    return torch.zeros(*index.shape[:2], n, dtype=torch.float64, device=device).scatter_add_(2, index, weight.double())


def _rounded(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torch's fixed-point rounding: (x + 2**(shift - 1)) >> shift, clamped to uint8's range."""
    s = shift.view(-1, 1, 1, 1)
    half = torch.where(s > 0, torch.exp2(s - 1), torch.zeros_like(s))
    return torch.floor((x + half) * torch.exp2(-s)).clamp_(0, 255)


@dataclass(frozen=True)
class BatchAugment:
    """The keyed ops (then a centre crop to image_size) for a batch of uint8 images (3, H, W) of any sizes.

    Each image's parameters come from (seed, epoch, index) alone, drawn once per batch, so every
    image gets the same pixels in any batch, alone or not, in either form.
    """

    ops: tuple[C.Augment, ...]
    image_size: int

    def plans(self, images: Sequence[torch.Tensor], seed: int, epoch: int, indices: list[int]) -> list[Plan]:
        draws = draws_for(self.ops, seed, epoch, indices)
        return [plan(self.ops, self.image_size, *image.shape[-2:], d) for image, d in zip(images, draws)]

    def __call__(self, images: Sequence[torch.Tensor], seed: int, epoch: int, indices: list[int]) -> torch.Tensor:
        """The per-image form, stacked: (N, 3, image_size, image_size) uint8, channels_last.

        channels_last because the cache keeps pixels (H, W, 3): stacking their crops is then a plain
        copy, and so is Normalize's conversion for a channels_last network."""
        rendered = [render(image, p) for image, p in zip(images, self.plans(images, seed, epoch, indices))]
        batch = torch.empty((len(rendered), 3, self.image_size, self.image_size), dtype=torch.uint8,
                            memory_format=torch.channels_last)
        return torch.stack(rendered, out=batch)

    def planned(self, images: Sequence[torch.Tensor], seed: int, epoch: int, indices: list[int]) -> Planned:
        """The batched form's inputs; `Planned.render` finishes it on the device."""
        plans = self.plans(images, seed, epoch, indices)
        height, width = max(im.shape[-2] for im in images), max(im.shape[-1] for im in images)
        pixels = torch.zeros(len(images), 3, height, width, dtype=torch.uint8)
        for out, image in zip(pixels, images):
            out[:, : image.shape[-2], : image.shape[-1]] = image
        rows = [axis_weights(p, im.shape[-2], -2) for p, im in zip(plans, images)]
        cols = [axis_weights(p, im.shape[-1], -1) for p, im in zip(plans, images)]
        shifts = torch.tensor([[r[1], c[1]] for r, c in zip(rows, cols)])
        return Planned(pixels, _compact([r[0] for r in rows], height), _compact([c[0] for c in cols], width), shifts)

    @property
    def batchable(self) -> bool:
        """Whether the batched form exists: it folds at most one resize (random_resized_crop) per image."""
        return sum(isinstance(op, C.RandomResizedCrop) for op in self.ops) <= 1


def split_transform(ops: list[C.Augment], image_size: int) -> v2.Compose | BatchAugment:
    """The keyed ops (BatchAugment) when every op has that form; else transforms v2 per image.

    Decided by the ops alone, never by the images' sizes: a BatchAugment takes any mix of sizes.
    """
    if all(isinstance(op, KEYED_OPS) for op in ops):
        return BatchAugment(tuple(ops), image_size)
    return build_augment(ops, image_size)
