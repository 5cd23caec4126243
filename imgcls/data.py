"""Data: class folders -> checked, decoded uint8 images -> augmented, normalised batches.

Each image is decoded once, upright and RGB, with its shorter side resized to `resize_size`
(torchvision's Resize(256) convention), and kept as a uint8 tensor (in the decoded cache).
Augmentations (imgcls.augment) then run on those tensors. A sample's augmentation randomness is
a pure function of (seed, epoch, index), so worker count, caching, prefetching and where the
augmentation runs cannot change a run's bits.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2
from typing_extensions import assert_never

from imgcls import config as C
from imgcls import augment, cache, distributed, provenance, runtime
from imgcls.errors import DataError

# torchvision's ImageFolder extensions.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
JUNK_FILES = {"thumbs.db", "desktop.ini"}
NORMALIZE = {"imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), "half": ([0.5] * 3, [0.5] * 3)}


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
            else:
                # The folder's real path is known: only a link needs resolving (realpath lstats every
                # component of the path: 7.8 s of a 70k-file scan).
                real_path = os.path.realpath(path) if os.path.islink(path) else os.path.join(real, fname)
                if real_path in seen_files:
                    skipped["duplicate link to the same file"] += 1
                    continue
                seen_files.add(real_path)
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


# ------------------------------------------------------------------------------------ normalising


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

    def forward(self, x: torch.Tensor | augment.Planned) -> torch.Tensor:
        if isinstance(x, augment.Planned):  # the batched form's keyed ops, finished here on the device
            x = x.render(self.scale.device)
        # Two passes over the batch instead of four: the layout change (none for the keyed ops'
        # channels_last batches into a channels_last network) rides on the uint8 -> float
        # conversion, and scale and shift are one multiply-add in place.
        x = x.to(self.scale.device, non_blocking=True)
        out = x.to(torch.float32, memory_format=self.memory_format, copy=True)
        if self.memory_format != torch.channels_last:
            return torch.addcmul(self.shift, out, self.scale, out=out)
        # Channels innermost: broadcast over them, the statistics would be applied 3 values at a
        # time. Over each row of pixels as one run of W * 3 values, with the statistics repeated W
        # times, the same multiply-add vectorises: 3-4x faster (bench.layout).
        n, c, h, w = out.shape
        rows = out.permute(0, 2, 3, 1).view(n * h, w * c)
        torch.addcmul(self.shift.view(c).repeat(w), rows, self.scale.view(c).repeat(w), out=rows)
        return out


# ------------------------------------------------------------------------------ datasets, loaders


# How a split's images are augmented; recorded in the run's report. The keyed ops' two forms give
# the same pixels, so between those two this is a choice of speed, never of result.
Form = Literal["keyed ops, per image", "keyed ops, batched on the device", "transforms v2, per image"]


class ImageSet(Dataset):
    """Items are keyed by (epoch, key) so a sample's randomness never depends on who loads it.

    The key picks the randomness; key % len(self) picks the image (keys past the end are repeats
    of an image within an epoch, see EpochBatches). In the batched form a batch comes out as
    (augment.Planned, labels), finished on the device by Normalize.
    """

    def __init__(self, split: Split, images: Sequence[torch.Tensor], transform: v2.Transform | augment.BatchAugment,
                 seed: int, batched: bool = False):
        assert not batched or isinstance(transform, augment.BatchAugment) and transform.batchable
        self.split, self.images, self.transform, self.seed, self.batched = split, images, transform, seed, batched

    @property
    def form(self) -> Form:
        if not isinstance(self.transform, augment.BatchAugment):
            return "transforms v2, per image"
        return "keyed ops, batched on the device" if self.batched else "keyed ops, per image"

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitems__(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor | augment.Planned, torch.Tensor] | list:
        """A whole batch (the DataLoader's batched fetch). The keyed ops draw once for it and hand back
        the finished batch (images, labels), stacked once; transforms v2 give per-sample pairs to collate."""
        epochs, indices = zip(*keys)
        images = take(self.images, [i % len(self) for i in indices])
        labels = torch.tensor([self.split.labels[i % len(self)] for i in indices])
        if isinstance(self.transform, augment.BatchAugment):
            assert len(set(epochs)) == 1, "a batch comes from one epoch"
            keyed = self.transform.planned if self.batched else self.transform
            return keyed(images, self.seed, epochs[0], list(indices)), labels
        return [(self._augment(im, e, i), int(label)) for im, e, i, label in zip(images, epochs, indices, labels)]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        """One sample, in the per-image form (the batched form gives the same pixels)."""
        epoch, index = key
        image, label = self.images[index % len(self)], self.split.labels[index % len(self)]
        if isinstance(self.transform, augment.BatchAugment):
            return self.transform([image], self.seed, epoch, [index])[0], label
        return self._augment(image, epoch, index), label

    def _augment(self, image: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        # Only the CPU generator (the one transforms v2 draw from) is seeded and restored:
        # torch.manual_seed also queues CUDA/XPU/MTIA seeding with a formatted stack trace each time,
        # which cost more than the augmentation itself.
        outer = torch.default_generator.get_state()
        try:
            torch.default_generator.manual_seed(augment.sample_seed(self.seed, epoch, index))
            return self.transform(image)
        finally:
            torch.default_generator.set_state(outer)


def take(images: Sequence[torch.Tensor], indices: list[int]) -> list[torch.Tensor]:
    """images[i] for each index; from the decoded cache, with its reads of consecutive images merged."""
    return images.take(indices) if isinstance(images, cache.Decoded) else [images[i] for i in indices]


def collate(batch: list | tuple) -> Any:
    """default_collate, except for a batch the dataset assembled itself (the keyed ops)."""
    return batch if isinstance(batch, tuple) else default_collate(batch)


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

    Across processes (`world`), the order and the batches are the same global ones: a training
    batch is cut into one contiguous slice per rank, so each optimizer step sees the samples of the
    single-process step; "in_order" (evaluation) gives each rank a contiguous shard of the split,
    every image on exactly one rank. IMGCLS_BATCH_LOG=PATH appends each training batch's keys to
    PATH.rank<r> (a debugging record: [epoch, step, keys] a line).
    """

    def __init__(self, labels: list[int], batch_size: int, order: Order, seed: int,
                 world: distributed.World = distributed.World()):
        self.labels, self.n, self.batch_size, self.order = labels, len(labels), batch_size, order
        self.seed, self.epoch, self.world = seed, 0, world
        log = os.environ.get("IMGCLS_BATCH_LOG")
        self.log = f"{log}.rank{world.rank}" if log and order != "in_order" else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _keys(self) -> list[int]:
        match self.order:
            case "in_order":
                return list(range(self.n))
            case "shuffle":
                g = torch.Generator().manual_seed(augment.sample_seed(self.seed, self.epoch, -1))
                return torch.randperm(self.n, generator=g).tolist()
            case "balanced":  # stream -2: never the same draws as the permutation of the same epoch
                return balanced_keys(self.labels, augment.sample_seed(self.seed, self.epoch, -2))
            case _:
                assert_never(self.order)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.order == "in_order":
            shard = self.shard()
            for start in range(0, len(shard), self.batch_size):
                yield [(self.epoch, k) for k in shard[start : start + self.batch_size]]
            return
        keys = self._keys()
        for start in range(0, self.n, self.batch_size):
            batch = keys[start : start + self.batch_size]
            if len(batch) == 1 and self.n > 1:
                return
            mine = batch[slice(*_bounds(len(batch), self.world)[self.world.rank : self.world.rank + 2])]
            if self.log:
                with open(self.log, "a") as f:
                    f.write(f"{[self.epoch, start // self.batch_size, mine]}\n")
            yield [(self.epoch, k) for k in mine]

    def shard(self) -> list[int]:
        """The images this rank evaluates: a contiguous part of the split, all of it in one process."""
        bounds = _bounds(self.n, self.world)
        return list(range(bounds[self.world.rank], bounds[self.world.rank + 1]))

    def __len__(self) -> int:
        if self.order == "in_order":
            return -(-len(self.shard()) // self.batch_size)
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest > 1 or (rest == 1 and self.n == 1))


def _bounds(n: int, world: distributed.World) -> list[int]:
    """Where each rank's part of n items starts (and the last ends): sizes differ by at most one."""
    return [n * r // world.size for r in range(world.size + 1)]


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
    dataset: ImageSet | FeatureSet, batch_size: int, order: Order, num_workers: int, seed: int, pin: bool = False,
    world: distributed.World = distributed.World(),
) -> DataLoader:
    """batch_size is the global batch: each of world's ranks loads its slice of it."""
    if num_workers > 0:
        runtime.share_batches_by_file()
    return DataLoader(
        dataset,
        batch_sampler=EpochBatches(dataset.split.labels, batch_size, order, seed, world),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),  # seeds worker base seeds; augmentation ignores them
        persistent_workers=num_workers > 0,
        collate_fn=collate,
        pin_memory=pin,  # page-locked batches copy to a GPU without blocking (Inputs sends them non_blocking)
    )


def build_loaders(exp: C.Experiment, dataset: Data, world: distributed.World = distributed.World()) -> dict[str, DataLoader]:
    """One loader per split: train shuffled and augmented, val/test in file order, centre crop only."""
    loaders = {name: split_loader(exp, split, dataset.images[name], world) for name, split in dataset.splits.items()}
    rest = len(dataset.splits["train"].paths) % exp.data.batch_size
    if 1 < rest < world.size:  # a rank would get no image of the epoch's last step
        raise DataError(
            f"{len(dataset.splits['train'].paths)} training images in batches of data.batch_size = {exp.data.batch_size} "
            f"leave a last batch of {rest}, fewer than the {world.size} processes that share it; "
            "change batch_size or the number of processes"
        )
    if len(loaders["train"]) == 0:  # a trailing batch of one is dropped (see EpochBatches)
        raise DataError(
            f"{len(dataset.splits['train'].paths)} training image(s) in batches of data.batch_size = "
            f"{exp.data.batch_size} give no optimizer step per epoch (a batch of one image is dropped: "
            "BatchNorm cannot train on it); add images or raise batch_size"
        )
    return loaders


def split_loader(
    exp: C.Experiment, split: Split, images: Sequence[torch.Tensor], world: distributed.World = distributed.World()
) -> DataLoader:
    is_train = split.name == "train"
    transform = augment.split_transform(exp.augment if is_train else [], exp.data.image_size)
    batch = exp.data.batch_size if is_train else exp.data.eval_batch_size
    order = exp.data.sampler if is_train else "in_order"
    device = runtime.resolve_device(exp.device, exp.train.precision)
    dataset = ImageSet(split, images, transform, exp.seed, batched_form(transform, device, is_train))
    return make_loader(dataset, batch, order, exp.data.num_workers, exp.seed, device.type == "cuda", world)


def batched_form(transform: v2.Transform | augment.BatchAugment, device: torch.device, is_train: bool) -> bool:
    """Whether a split's keyed ops run in their batched form, on the device; else per image, in the loader.

    Where each is cheaper: on CPU cores torch's per-image uint8 resize (~0.75 ms an image at 224,
    one core) beats the batched form's float64 matmuls ~90x; a GPU does those in microseconds and
    frees the loader's workers. Evaluation's centre crop is a slice either way, so it stays per image.
    """
    keyed = isinstance(transform, augment.BatchAugment) and transform.batchable
    return keyed and is_train and device.type == "cuda"


def transform_paths(loaders: dict[str, DataLoader]) -> dict[str, Form]:
    """How each split is augmented (ImageSet.form); runs record it."""
    return {name: loader.dataset.form for name, loader in loaders.items()}


# ------------------------------------------------------------------------------------- preflight


@dataclass
class Data:
    """Everything the run needs from the data section, checked before the first epoch."""

    classes: list[str]
    splits: dict[str, Split]
    images: dict[str, Sequence[torch.Tensor]]
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
    images: dict[str, Sequence[torch.Tensor]] = {}
    bad: list[str] = []
    for name, split in splits.items():
        decoded, failures = decode_split(split, cfg, progress)
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
    near, conflicts, bits = report["near_duplicates"], report["label_conflicts"], provenance.NEAR_DUPLICATE_BITS
    findings = [
        ("leakage", cfg.leakage, len(report["leakage"]), report["leakage"],
         f"{len(report['leakage'])} file(s) in train are byte-identical to files in val/test", lambda p: f"{p[0]} == {p[1]}"),
        ("leakage", cfg.leakage, near["pairs"], near["listed"],
         f"{near['images']} image(s) in val/test look like resized or re-encoded copies of training images "
         f"({near['pairs']} pair(s) within {bits} bits)" + _alike(near),
         lambda p: f"{p['train']} ~ {p['other']} ({p['bits']} bits apart)"),
        ("label_conflicts", cfg.label_conflicts, conflicts["pairs"], conflicts["listed"],
         f"{conflicts['pairs']} pair(s) of files under two classes look like one photo ({conflicts['images']} files)"
         + _alike(conflicts),
         lambda p: f"{p['a']} ({p['class_a']}) ~ {p['b']} ({p['class_b']})"),
    ]
    for key, policy, count, listed, message, show in findings:
        if not count:
            continue
        if policy == "fail":
            listing = "\n".join(f"  - {show(p)}" for p in listed[:20])
            raise DataError(f"{message}:\n{listing}\nremove the copies, or set data.{key} = \"warn\"")
        report["warnings"].append(message)


def _alike(finding: dict) -> str:
    if finding["pairs"] < max(1, ALIKE_PAIRS_PER_IMAGE * finding["images"]):
        return ""
    return (f"; {finding['pairs'] / finding['images']:.0f} pairs an image: the perceptual hash tells these images apart "
            "poorly (tiny or alike images), so most pairs are not copies")


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


def decode_split(split: Split, cfg: C.DataConfig, progress: bool) -> tuple[cache.Decoded, list[str]]:
    """Every file of a split read once and decoded once (or found in the decoded cache); the split
    keeps the readable ones, with the size and SHA-256 of the bytes that were decoded. Returns the
    images and the unreadable files' errors."""
    found = cache.decoded_split(
        split.paths, cfg.resize_size, cfg.cache_dir, cache.workers_for(cfg.decode_workers), progress, split.name
    )
    split.paths = [split.paths[i] for i in found.kept]
    split.labels = [split.labels[i] for i in found.kept]
    split.sizes, split.sha256, split.phashes = found.sizes, found.sha256, found.images.phashes
    if not split.paths:
        raise DataError(f"{split.root}: no readable images in the {split.name} split")
    return found.images, found.failures


# Pairs kept in preflight.json per finding, closest first; the counts cover them all. Tiny or alike
# images (Fashion-MNIST's 28 px silhouettes) put ~1.5M pairs within the threshold: a 300 MB report.
LISTED_PAIRS = 1000
# A real copy matches one training image, or a few; an image matching this many on average says the
# hash cannot tell the data's images apart, and the warning says so.
ALIKE_PAIRS_PER_IMAGE = 10


def _near_duplicates(splits: dict[str, Split], classes: list[str]) -> tuple[dict, dict]:
    """Pairs of images within provenance.NEAR_DUPLICATE_BITS of each other, compared against train:
    a copy in val/test that is not byte-identical (leakage), and one photo under two classes
    (a conflict, within train or across splits). Each finding counts its pairs and the images in
    them (leaks: the val/test images; conflicts: the files on either side), and lists the
    LISTED_PAIRS closest pairs."""
    names, train = list(splits), splits["train"]
    train_labels, train_sha = np.asarray(train.labels), np.asarray(train.sha256)
    leaks, conflicts = [np.empty((4, 0), np.int64)], [np.empty((4, 0), np.int64)]  # rows: split, i (train), j, bits
    for k, (name, split) in enumerate(splits.items()):
        i, j, bits = provenance.near_duplicates(train.phashes, split.phashes, provenance.NEAR_DUPLICATE_BITS).T
        if name == "train":
            i, j, bits = i[i < j], j[i < j], bits[i < j]  # each pair once, and never an image with itself
        pairs = np.stack([np.full_like(i, k), i, j, bits])
        differ = train_labels[i] != np.asarray(split.labels)[j]
        conflicts.append(pairs[:, differ])
        if name != "train":
            leaks.append(pairs[:, ~differ & (train_sha[i] != np.asarray(split.sha256)[j])])  # byte-identical: `leakage`
    leak, conflict = np.concatenate(leaks, axis=1), np.concatenate(conflicts, axis=1)

    def closest(found: np.ndarray) -> list[list[int]]:
        return found[:, np.lexsort(found[[2, 1, 0, 3]])[:LISTED_PAIRS]].T.tolist()  # by bits, then split, i, j

    def files(*sides: np.ndarray) -> int:
        return len(np.unique(np.concatenate([split << 32 | index for split, index in sides])))

    train_k = np.full_like(conflict[1], names.index("train"))
    return (
        {"pairs": leak.shape[1], "images": files((leak[0], leak[2])),
         "listed": [{"train": train.paths[i], "other": splits[names[k]].paths[j], "bits": b} for k, i, j, b in closest(leak)]},
        {"pairs": conflict.shape[1], "images": files((train_k, conflict[1]), (conflict[0], conflict[2])),
         "listed": [{"a": train.paths[i], "class_a": classes[train.labels[i]], "b": splits[names[k]].paths[j],
                     "class_b": classes[splits[names[k]].labels[j]], "bits": b} for k, i, j, b in closest(conflict)]},
    )


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
