"""Claim 11 (transforms part): eval transforms are deterministic, train augmentations keep shape, dtype, label.

Images reach the transforms as `decoding.decode` leaves them: uint8 (3, H, W) with the shorter side
equal to data.resize_size. Samples are drawn through `data.ImageSet`, keyed by (epoch, index).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from imgcls import augment
from imgcls import config as C
from imgcls import data
from imgcls.errors import ConfigError

from .strategies import AUGMENT_FIELDS, RUNNABLE_AUGMENT_FIELDS, augment_ops, generator, seeds, tag_of
from .support import falsify


def decoded_image(resize_size: int, longer: int, portrait: bool, seed: int) -> torch.Tensor:
    h, w = (longer, resize_size) if portrait else (resize_size, longer)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator(seed))


def image_set(images: list[torch.Tensor], labels: list[int], transform, seed: int) -> data.ImageSet:
    split = data.Split("train", "unused", [f"{i}.png" for i in range(len(images))], labels)
    return data.ImageSet(split, images, transform, seed)


@st.composite
def decoded(draw) -> dict:
    image_size = draw(st.integers(8, 24))
    resize_size = draw(st.integers(image_size, image_size + 8))
    return {
        "image_size": image_size,
        "resize_size": resize_size,
        "longer": draw(st.integers(resize_size, resize_size + 8)),
        "portrait": draw(st.booleans()),
        "seed": draw(seeds),
    }


# ------------------------------------------------------------------------------------ eval


def check_eval_deterministic(make_transform, d: dict) -> None:
    """The same sample, fetched in different epochs under different global RNG states, is identical."""
    image = decoded_image(d["resize_size"], d["longer"], d["portrait"], d["seed"])
    items = image_set([image], [0], make_transform(d["image_size"]), d["seed"])
    torch.manual_seed(d["seed"])
    first = items[(1, 0)][0]
    torch.manual_seed(d["seed"] + 1)
    again = items[(2, 0)][0]
    assert torch.equal(first, again)
    assert first.shape == (3, d["image_size"], d["image_size"]) and first.dtype == torch.uint8


@given(decoded())
def test_eval_transform_is_deterministic(d):
    """Every eval transform is deterministic: the centre crop gives the same pixels in every epoch and
    under every global RNG state."""
    check_eval_deterministic(augment.eval_transform, d)


def test_eval_check_catches_an_augmentation_used_for_evaluation():
    """Broken variant: a training pipeline (random crop, flip) used as the eval transform."""
    ops = [C.RandomResizedCrop(op="random_resized_crop"), C.HorizontalFlip(op="horizontal_flip")]
    falsify(lambda d: check_eval_deterministic(lambda size: augment.build_augment(ops, size), d), decoded())


# ----------------------------------------------------------------------------------- train


def experiment(d: dict, ops: list[dict]) -> C.Experiment:
    return C.validate(
        {
            "name": "t",
            "data": {"train_dir": "t", "val_dir": "v", "image_size": d["image_size"], "resize_size": d["resize_size"]},
            "augment": ops,
            "model": {"arch": "scratch_cnn", "channels": [2]},
        }
    )


def check_augment_keeps_shape_dtype_label(build, d: dict, ops: list[dict], label: int, epoch: int) -> None:
    """Schema-accepted pipelines give (3, image_size, image_size) uint8 and the same label; the schema
    refuses the others by their augment index, before any image is read."""
    try:
        exp = experiment(d, ops)
    except ConfigError as e:
        assert all("augment[" in p for p in e.problems), e.problems
        return
    image = decoded_image(d["resize_size"], d["longer"], d["portrait"], d["seed"])
    items = image_set([image, image], [label, label + 1], build(exp.augment, d["image_size"]), d["seed"])
    for index in (0, 1):
        out, out_label = items[(epoch, index)]
        assert out.shape == (3, d["image_size"], d["image_size"]), out.shape
        assert out.dtype == torch.uint8
        assert out_label == label + index


pipelines = st.tuples(
    decoded(),
    st.lists(augment_ops(RUNNABLE_AUGMENT_FIELDS), min_size=1, max_size=3),
    st.integers(0, 9),
    st.integers(1, 50),
)


SMALL = {"image_size": 8, "resize_size": 8, "longer": 8, "portrait": False, "seed": 0}
# Counterexamples hypothesis found: each crashed torchvision inside the epoch until the schema refused it.
CRASHED = [
    (SMALL, [{"op": "gaussian_blur", "kernel_size": 17}], 0, 1),  # reflect padding 8 on an 8-pixel side
    (SMALL, [{"op": "random_resized_crop", "ratio": [0.0625, 0.0625]}], 0, 1),  # fallback crop 0 pixels wide
    (SMALL, [{"op": "random_erasing", "p": 1.0, "ratio": [0.0, 1.0]}], 0, 1),  # log(0)
    (SMALL, [{"op": "random_crop", "padding": 8, "padding_mode": "reflect"}], 0, 1),
    (
        SMALL | {"image_size": 24, "resize_size": 24, "longer": 24},
        [{"op": "resize", "size": 8}, {"op": "random_crop", "padding_mode": "symmetric"}],
        0,
        1,
    ),
]
# ...and their neighbours that work, which the schema must keep accepting.
WORKS = [
    (SMALL, [{"op": "gaussian_blur", "kernel_size": 15}], 0, 1),
    (SMALL, [{"op": "random_resized_crop", "ratio": [0.125, 0.125]}], 0, 1),
    (SMALL, [{"op": "random_crop", "padding": 7, "padding_mode": "reflect"}], 0, 1),
    (SMALL, [{"op": "random_crop", "padding": 8, "padding_mode": "symmetric"}], 0, 1),
]


@given(pipelines)
@example(CRASHED[0])
@example(CRASHED[1])
@example(CRASHED[2])
@example(CRASHED[3])
@example(CRASHED[4])
def test_every_train_augmentation_keeps_shape_dtype_and_label(args):
    """Every train augmentation keeps shape, dtype and label: after any list of schema ops, a sample is a
    (3, image_size, image_size) uint8 image with its own label."""
    check_augment_keeps_shape_dtype_label(augment.build_augment, *args)


def test_augment_check_catches_a_pipeline_without_final_crop_or_with_float_output():
    """Broken variants: dropping the final centre crop, and converting to float before the model's Normalize."""
    from torchvision.transforms import v2

    def no_crop(ops, size):
        return v2.Compose([augment._augment_op(op, size) for op in ops])

    def to_float(ops, size):
        return v2.Compose([augment.build_augment(ops, size), v2.ToDtype(torch.float32, scale=True)])

    falsify(lambda args: check_augment_keeps_shape_dtype_label(no_crop, *args), pipelines)
    falsify(lambda args: check_augment_keeps_shape_dtype_label(to_float, *args), pipelines)


@pytest.mark.parametrize("args", CRASHED)
def test_schema_refuses_the_pipelines_torchvision_cannot_run(args):
    """The pinned counterexamples are refused by the schema, and do crash when built without its checks."""
    d, ops, _, _ = args
    with pytest.raises(ConfigError, match=r"augment\[\d\]"):
        experiment(d, ops)
    op_class = {tag_of(cls)[1]: cls for cls in AUGMENT_FIELDS}
    unchecked = [op_class[op["op"]].model_construct(**op) for op in ops]  # model_construct skips validation
    image = decoded_image(d["resize_size"], d["longer"], d["portrait"], d["seed"])
    with pytest.raises((RuntimeError, IndexError)):
        augment.build_augment(unchecked, d["image_size"])(image)


@pytest.mark.parametrize("args", WORKS)
def test_schema_accepts_the_pipelines_at_the_limit(args):
    """One step short of each refused case, the schema accepts the pipeline and it runs."""
    d, ops, label, epoch = args
    experiment(d, ops)
    check_augment_keeps_shape_dtype_label(augment.build_augment, d, ops, label, epoch)


# --------------------------------------------------------------------------------- batched

BATCHED_FIELDS = {cls: fields for cls, fields in RUNNABLE_AUGMENT_FIELDS.items() if issubclass(cls, augment.KEYED_OPS)}
batched_pipelines = st.tuples(
    decoded(), st.lists(augment_ops(BATCHED_FIELDS), max_size=3), st.integers(0, 9), st.integers(1, 50)
)


@given(batched_pipelines)
def test_keyed_augmentation_keeps_shape_dtype_and_label(args):
    """The keyed ops (random_resized_crop, random_crop, flips; their draws made per batch) keep shape, dtype and label too."""
    check_augment_keeps_shape_dtype_label(augment.BatchAugment, *args)


def batch_of(items: data.ImageSet, keys: list) -> tuple[list[torch.Tensor], list[int]]:
    """The loader's view of one batch, as images and labels, whichever form the dataset returns."""
    out = data.collate(items.__getitems__(keys))
    return list(out[0]), [int(label) for label in out[1]]


def check_batch_is_each_image_alone(augment, d: dict, ops: list[dict], epoch: int, n: int) -> None:
    """A sample augmented within a batch equals the same sample augmented alone: its draws depend on
    (seed, epoch, index), never on the batch it shares, its place in it, or its neighbours' sizes."""
    try:
        exp = experiment(d, ops)
    except ConfigError:
        return
    # Decoded images of a split differ in size (photos): image i is i pixels longer, every other one turned.
    images = [decoded_image(d["resize_size"], d["longer"] + i, d["portrait"] ^ (i % 2 == 1), d["seed"] + i) for i in range(n)]
    items = image_set(images, list(range(n)), augment(tuple(exp.augment), d["image_size"]), d["seed"])
    keys = [(epoch, i) for i in reversed(range(n))]
    for together, label, key in zip(*batch_of(items, keys), keys):
        alone, alone_label = items[key]
        assert torch.equal(together, alone) and label == alone_label, key


batches = st.tuples(decoded(), st.lists(augment_ops(BATCHED_FIELDS), min_size=1, max_size=3), st.integers(0, 9), st.integers(2, 6))


@given(batches)
def test_a_batched_sample_does_not_depend_on_its_batch(args):
    check_batch_is_each_image_alone(augment.BatchAugment, *args)


def test_batch_check_catches_draws_keyed_by_place_in_batch():
    """Broken variant: each sample's draws keyed by its position in the batch instead of its index."""

    class ByPosition(augment.BatchAugment):
        def __call__(self, images, seed, epoch, indices):
            return super().__call__(images, seed, epoch, list(range(len(indices))))

    falsify(lambda args: check_batch_is_each_image_alone(ByPosition, *args), batches)


def check_crop_is_a_window(crop, padding: int, mode: str, size: int, extra: int, seed: int) -> None:
    """Each output of random_crop is one size x size window of the padded image, as torchvision pads it."""
    from torchvision.transforms import v2

    image = torch.randint(0, 256, (3, size + extra, size + extra), dtype=torch.uint8, generator=generator(seed))
    op = C.RandomCrop(op="random_crop", padding=padding, padding_mode=mode)
    outs = crop(image.expand(8, -1, -1, -1), op, size, *(augment.sample_uniforms(seed, 1, list(range(8)), s) for s in (1, 2)))
    padded = v2.functional.pad(image, [padding], padding_mode=mode) if padding else image
    windows = padded.unfold(1, size, 1).unfold(2, size, 1)  # (3, rows, cols, size, size)
    for out in outs:
        hits = (windows == out[:, None, None]).flatten(3).all(-1).all(0)
        assert hits.any(), "not a window of the padded image"


def _paddable(args: tuple) -> bool:
    """What the schema lets through (config._augment_size_problems): reflect pads less than the
    side it mirrors, symmetric at most the side."""
    padding, mode, size, extra, _ = args
    return {"reflect": padding < size + extra, "symmetric": padding <= size + extra}.get(mode, True)


crops = st.tuples(
    st.integers(0, 4), st.sampled_from(["constant", "edge", "reflect", "symmetric"]), st.integers(4, 12), st.integers(0, 4), seeds
).filter(_paddable)


@given(crops)
@example((4, "reflect", 5, 0, 0))  # the widest reflect padding a 5-px side allows
def test_batched_random_crop_takes_windows_of_the_padded_image(args):
    check_crop_is_a_window(keyed_random_crops, *args)


def keyed_random_crops(images, op, size, u_top, u_left):
    return [augment.render(im, augment._random_crop(op, size, *im.shape[-2:], (t, l))) for im, t, l in zip(images, u_top.tolist(), u_left.tolist())]


def test_window_check_catches_a_resize_instead_of_a_crop():
    """Broken variant: the padded image squeezed to size (a resize) instead of cropped."""
    from torchvision.transforms import v2

    def squeeze(images, op, size, u_top, u_left):
        padded = v2.functional.pad(images, [op.padding], padding_mode=op.padding_mode) if op.padding else images
        return v2.functional.resize(padded, [size, size], antialias=True)

    falsify(lambda args: check_crop_is_a_window(squeeze, *args), crops)


def check_flip_rate(augment, p: float, seed: int) -> None:
    """horizontal_flip flips each image with probability p: the count over 2,000 indices lies within
    6 standard deviations of 2,000 p (exactly 0 or 2,000 when p is 0 or 1)."""
    n = 2000
    image = torch.arange(3 * 4 * 4, dtype=torch.uint8).view(1, 3, 4, 4).expand(n, -1, -1, -1)
    out = augment((C.HorizontalFlip(op="horizontal_flip", p=p),), 4)(image, seed, 1, list(range(n)))
    flipped = int((out != image).flatten(1).any(1).sum())
    assert abs(flipped - n * p) <= 6 * (n * p * (1 - p)) ** 0.5, (flipped, p)


flip_rates = st.tuples(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]) | st.floats(0, 1), seeds)


@given(flip_rates)
def test_batched_flip_happens_at_rate_p(args):
    check_flip_rate(augment.BatchAugment, *args)


def test_flip_rate_check_catches_a_flip_that_ignores_p():
    class HalfTheTime(augment.BatchAugment):
        def __call__(self, images, seed, epoch, indices):
            ops = tuple(op.model_copy(update={"p": 0.5}) for op in self.ops)
            return augment.BatchAugment(ops, self.image_size)(images, seed, epoch, indices)

    falsify(lambda args: check_flip_rate(HalfTheTime, *args), flip_rates)


# ------------------------------------------------------------ the keyed ops' two forms

def check_forms_agree(render_batched, d: dict, ops: list[dict], epoch: int, n: int) -> None:
    """The keyed ops' batched form (integer weight matrices on a padded stack, picked on a GPU) gives
    the per-image form's pixels (slices, pads, flips, torch's uint8 resize), for any mix of sizes."""
    try:
        exp = experiment(d, ops)
    except ConfigError:
        return
    keyed = augment.BatchAugment(tuple(exp.augment), d["image_size"])
    if not keyed.batchable:
        return
    images = [decoded_image(d["resize_size"], d["longer"] + 3 * i, d["portrait"] ^ (i % 2 == 1), d["seed"] + i) for i in range(n)]
    indices = [7 * i + 1 for i in range(n)]
    per_image = keyed(images, d["seed"], epoch, indices)
    batched = render_batched(keyed.planned(images, d["seed"], epoch, indices))
    assert batched.dtype == torch.uint8 and torch.equal(per_image, batched), (per_image.int() - batched.int()).abs().max()


@st.composite
def larger(draw) -> dict:
    """Sizes where a resize weighs several pixels a tap (downscaling by up to ~4x) or upscales."""
    image_size = draw(st.integers(4, 40))
    resize_size = draw(st.integers(image_size, 4 * image_size))
    return {"image_size": image_size, "resize_size": resize_size, "longer": draw(st.integers(resize_size, resize_size + 60)),
            "portrait": draw(st.booleans()), "seed": draw(seeds)}


two_forms = st.tuples(larger(), st.lists(augment_ops(BATCHED_FIELDS), max_size=3), st.integers(0, 9), st.integers(1, 4))


@given(two_forms)
@example(({"image_size": 24, "resize_size": 90, "longer": 130, "portrait": True, "seed": 3},
          [{"op": "random_resized_crop", "scale": [0.9, 1.0]}, {"op": "horizontal_flip", "p": 1.0}], 2, 3))
@example(({"image_size": 16, "resize_size": 16, "longer": 20, "portrait": False, "seed": 1},
          [{"op": "random_crop", "padding": 5, "padding_mode": "reflect"}, {"op": "random_resized_crop"}], 0, 2))
def test_the_keyed_ops_two_forms_give_identical_batches(args):
    check_forms_agree(lambda planned: planned.render(torch.device("cpu")), *args)


def test_forms_check_catches_a_batched_form_that_resizes_rows_first():
    """Broken variant: the batched form's two passes in the other order (rows, then columns): each
    pass rounds to uint8, so the order shows in the last bit wherever both axes are resized."""

    def rows_first(planned):
        x = planned.pixels.double()
        n, _, height, width = x.shape
        cols, rows = augment._dense(planned.cols, width, x.device), augment._dense(planned.rows, height, x.device)
        shifts = planned.shifts.double()
        x = augment._rounded(rows.unsqueeze(1) @ x, shifts[:, 0])
        return augment._rounded(x @ cols.transpose(1, 2).unsqueeze(1), shifts[:, 1]).to(torch.uint8)

    resized = st.tuples(larger(), st.just([{"op": "random_resized_crop"}]), st.integers(0, 9), st.integers(1, 4))
    falsify(lambda args: check_forms_agree(rows_first, *args), resized)


def check_resize_weights(weights, n_in: int, n_out: int, rows: int, seed: int) -> None:
    """Integer weights and shift reproduce torch's uint8 antialiased bilinear resize of one axis exactly."""
    from torchvision.transforms import v2

    image = torch.randint(0, 256, (3, rows, n_in), dtype=torch.uint8, generator=generator(seed))
    w, shift = weights(n_in, n_out)
    sums = image.long() @ torch.from_numpy(w).T
    ours = ((sums + (1 << shift >> 1)) >> shift).clamp(0, 255).to(torch.uint8)
    assert torch.equal(ours, v2.functional.resize(image, [rows, n_out], antialias=True))


resizes = st.tuples(st.integers(1, 600), st.integers(1, 300), st.integers(1, 4), seeds).filter(lambda a: a[0] != a[1])


@given(resizes)
def test_integer_resize_weights_reproduce_torchs_uint8_resize(args):
    check_resize_weights(augment.resize_weights, *args)


def test_resize_check_catches_weights_one_below_torchs():
    def truncated(n_in, n_out):
        w, shift = augment.resize_weights(n_in, n_out)
        return w - (w > 0), shift

    falsify(lambda args: check_resize_weights(truncated, *args), resizes)


@given(st.tuples(st.integers(1, 40), st.integers(1, 60), st.integers(1, 60), seeds))
def test_the_keyed_centre_crop_is_torchvisions(args):
    """With no ops, both forms give v2.CenterCrop's pixels, zero padding included for short sides."""
    size, h, w, seed = args
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator(seed))
    keyed = augment.BatchAugment((), size)
    want = augment.eval_transform(size)(image)
    assert torch.equal(keyed([image], seed, 0, [0])[0], want)
    assert torch.equal(keyed.planned([image], seed, 0, [0]).render(torch.device("cpu"))[0], want)


def test_keyed_random_resized_crop_boxes_are_distributed_as_torchvisions():
    """Boxes lie in the image, and their area fraction and log aspect ratio have the distribution of
    torchvision's RandomResizedCrop.make_params (means within 5 standard errors, 4,000 boxes each),
    fallback centre crops included (a narrow 60x400 image makes most tries miss)."""
    import math

    from torchvision.transforms import v2

    for op, (h, w) in [(C.RandomResizedCrop(op="random_resized_crop", scale=[0.35, 1.0]), (300, 400)),
                       (C.RandomResizedCrop(op="random_resized_crop", scale=[0.5, 1.0], ratio=[0.5, 2.0]), (60, 400))]:
        n = 4000
        draws = augment.draws_for([op], 11, 3, list(range(n)))
        ours = [augment.resized_crop_box(op, h, w, d[0]) for d in draws]
        assert all(0 <= t and 0 <= l and 0 < bh and 0 < bw and t + bh <= h and l + bw <= w for t, l, bh, bw in ours)
        reference = v2.RandomResizedCrop(8, scale=tuple(op.scale), ratio=tuple(op.ratio))
        torch.manual_seed(0)
        theirs = []
        for _ in range(n):
            p = reference.make_params([torch.empty(3, h, w)])
            theirs.append((p["top"], p["left"], p["height"], p["width"]))
        for stat in (lambda b: b[2] * b[3] / (h * w), lambda b: math.log(b[3] / b[2])):
            a, b = torch.tensor([stat(x) for x in ours]), torch.tensor([stat(x) for x in theirs])
            se = math.sqrt(a.var() / n + b.var() / n)
            assert abs(a.mean() - b.mean()) <= 5 * se, (a.mean(), b.mean(), se)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@given(two_forms)
def test_the_batched_form_on_a_gpu_gives_the_per_image_forms_pixels(args):
    check_forms_agree(lambda planned: planned.render(torch.device("cuda")).cpu(), *args)


@given(st.tuples(seeds, st.integers(0, 10**6), st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=8),
                 st.lists(st.integers(-3, 10**6), min_size=1, max_size=6)))
def test_draws_for_several_streams_at_once_are_each_streams_own(args):
    """The keyed ops draw all of an op's streams in one call; each row must be that stream drawn alone,
    so the batching of draws can never change a sample."""
    seed, epoch, indices, streams = args
    together = augment.sample_uniforms(seed, epoch, indices, streams)
    for row, stream in zip(together, streams):
        assert torch.equal(row, augment.sample_uniforms(seed, epoch, indices, stream))


# ----------------------------------------------------------- the cache's (H, W, 3) layout


def interleaved_copy(image: torch.Tensor) -> torch.Tensor:
    """The same pixels as the decoded cache returns them: a (3, H, W) view of (H, W, 3) memory."""
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def check_layout_is_no_value(as_cached, d: dict, ops: list[dict], epoch: int, n: int) -> None:
    """A batch of samples is the same from images in (3, H, W) memory and from the cache's (H, W, 3)
    memory, for every op (keyed or transforms v2): the layout is a speed choice, never a value."""
    try:
        exp = experiment(d, ops)
    except ConfigError:
        return
    images = [decoded_image(d["resize_size"], d["longer"] + 3 * i, d["portrait"] ^ (i % 2 == 1), d["seed"] + i) for i in range(n)]
    keys = [(epoch, 5 * i + 2) for i in range(n)]
    make = augment.split_transform(exp.augment, d["image_size"])
    planar = batch_of(image_set(images, list(range(n)), make, d["seed"]), keys)
    cached = batch_of(image_set([as_cached(im) for im in images], list(range(n)), make, d["seed"]), keys)
    assert planar[1] == cached[1]
    for a, b in zip(planar[0], cached[0]):
        assert torch.equal(a, b), (a.int() - b.int()).abs().max()


layouts = st.tuples(larger(), st.lists(augment_ops(RUNNABLE_AUGMENT_FIELDS), max_size=3), st.integers(0, 9), st.integers(1, 4))


@given(layouts)
def test_samples_are_the_same_from_the_caches_interleaved_pixels(args):
    check_layout_is_no_value(interleaved_copy, *args)


def test_layout_check_catches_interleaved_bytes_read_as_planes():
    """Broken variant: a cache reader that views the (H, W, 3) bytes as (3, H, W), as the cache's
    FORMAT 1 stored them."""
    falsify(lambda args: check_layout_is_no_value(lambda im: im.permute(1, 2, 0).contiguous().view(im.shape), *args), layouts)
