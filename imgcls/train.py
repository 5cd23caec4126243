"""Training: the optimizer and scheduler builders, the best/early-stopping monitor, and the loop.

The loop is flat PyTorch: one epoch is forward, loss, backward, step over the loader. Its whole
state (weights, optimizer, scheduler, monitor, history, RNG) is saved after every epoch, so a
killed run resumes at the next epoch with exactly the bits it would have had.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader
from tqdm import tqdm
from typing_extensions import assert_never

from imgcls import config as C
from imgcls import data, distributed, models, runtime
from imgcls.errors import ConfigError, NonFiniteLoss


def build_optimizer(cfg: C.Optimizer, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    match cfg:
        case C.Adam():
            return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        case C.AdamW():
            return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        case C.SGD():
            return torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
            )
        case _:
            assert_never(cfg)


@dataclass
class Schedule:
    """A torch scheduler plus when it steps: after each batch (onecycle) or each epoch (the rest)."""

    scheduler: Any
    per_batch: bool
    monitor: str | None = None  # plateau: the metric passed to step()


class WarmupPlateau:
    """Linear warm-up, then ReduceLROnPlateau: torch's SequentialLR cannot chain a plateau scheduler
    (its step takes a metric), so this steps the warm-up for the first `epochs` epochs and the plateau
    scheduler after, which never sees a warm-up epoch's metric. Resumes through state_dict as torch's do."""

    def __init__(self, warmup: lr_scheduler.LinearLR, plateau: lr_scheduler.ReduceLROnPlateau, epochs: int):
        self.warmup, self.plateau, self.epochs, self.last_epoch = warmup, plateau, epochs, 0

    def step(self, metric: float) -> None:
        self.last_epoch += 1
        if self.last_epoch <= self.epochs:
            self.warmup.step()
        else:
            self.plateau.step(metric)

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "warmup": self.warmup.state_dict(), "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = state["last_epoch"]
        self.warmup.load_state_dict(state["warmup"])
        self.plateau.load_state_dict(state["plateau"])


def build_scheduler(cfg: C.Scheduler, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int) -> Schedule:
    match cfg:
        case C.NoScheduler():
            return _warmed_up(cfg, optimizer, lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))
        case C.StepLR():
            return _warmed_up(cfg, optimizer, lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma))
        case C.CosineLR():
            # The cosine spans the epochs after the warm-up, so it still ends at eta_min after the last one.
            cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs - cfg.warmup_epochs, eta_min=cfg.eta_min)
            return _warmed_up(cfg, optimizer, cosine)
        case C.PlateauLR():
            mode = "min" if cfg.monitor == "val_loss" else "max"
            plateau = lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=mode, factor=cfg.factor, patience=cfg.patience, min_lr=cfg.min_lr
            )
            if cfg.warmup_epochs:
                plateau = WarmupPlateau(_linear_warmup(cfg, optimizer), plateau, cfg.warmup_epochs)
            return Schedule(plateau, per_batch=False, monitor=cfg.monitor)
        case C.OneCycleLR():
            total = epochs * steps_per_epoch
            if cfg.pct_start * total == 1:  # torch's OneCycleLR divides by pct_start * total - 1
                raise ConfigError(
                    "experiment",
                    [
                        f"scheduler.pct_start = {cfg.pct_start} makes the warm-up exactly 1 of the {total} optimizer "
                        f"steps ({epochs} epochs x {steps_per_epoch} batches), which OneCycleLR cannot schedule; "
                        "choose another pct_start"
                    ],
                )
            onecycle = lr_scheduler.OneCycleLR(
                optimizer, max_lr=cfg.max_lr, epochs=epochs, steps_per_epoch=steps_per_epoch, pct_start=cfg.pct_start,
                cycle_momentum=False,  # keep the momentum/betas the experiment sets instead of torch's 0.85-0.95 cycle
            )
            return Schedule(onecycle, per_batch=True)
        case _:
            assert_never(cfg)


WarmedUp = C.NoScheduler | C.StepLR | C.CosineLR | C.PlateauLR


def _linear_warmup(cfg: WarmedUp, optimizer: torch.optim.Optimizer) -> lr_scheduler.LinearLR:
    """lr * (start + (1 - start) * epoch / warmup_epochs) for epoch < warmup_epochs, then lr."""
    return lr_scheduler.LinearLR(optimizer, cfg.warmup_start_factor, 1.0, total_iters=cfg.warmup_epochs)


def _warmed_up(cfg: WarmedUp, optimizer: torch.optim.Optimizer, main: lr_scheduler.LRScheduler) -> Schedule:
    """`main` as is without warm-up (the checkpoint keeps its plain state), else after a LinearLR warm-up."""
    if not cfg.warmup_epochs:
        return Schedule(main, per_batch=False)
    # SequentialLR resets the lr to initial_lr and replays the first scheduler's initial step, so the
    # order the two were built in (each changes the optimizer's lr) does not matter.
    sequence = lr_scheduler.SequentialLR(optimizer, [_linear_warmup(cfg, optimizer), main], milestones=[cfg.warmup_epochs])
    return Schedule(sequence, per_batch=False)


class Ema:
    """An exponential moving average of a model's weights, updated after every optimizer step:
    ema = decay * ema + (1 - decay) * weights, over every floating-point tensor of the state dict
    (parameters and BatchNorm statistics, as timm's ModelEmaV3 does); integer buffers (BatchNorm's
    batch counter) are copied. It starts from the model's initial weights, without warm-up.

    lerp, not the two products: ema + w * (weights - ema) leaves a tensor that never changed (a frozen
    backbone) bit-identical, where decay * ema + (1 - decay) * ema may round away from it.
    """

    def __init__(self, model: models.Classifier, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged, copied = [], []
        for ema, current in zip(self.model.state_dict(keep_vars=True).values(),
                                model.state_dict(keep_vars=True).values(), strict=True):
            if isinstance(current, nn.Parameter) and not current.requires_grad:
                continue  # frozen (a backbone's 11M weights): its lerp would leave it as it is, bit for bit
            (averaged if ema.is_floating_point() else copied).append((ema, current))
        if averaged:  # one call for all tensors: on a GPU, a few fused kernels instead of one per tensor
            torch._foreach_lerp_([e for e, _ in averaged], [c for _, c in averaged], 1.0 - self.decay)
        for ema, current in copied:
            ema.copy_(current)


@dataclass
class Optimization:
    """What one optimizer step needs besides the batch: the loss, the optimizer and its schedule, the
    fp16 gradient scaler (a pass-through unless train.precision = "fp16"), clipping and the average."""

    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    clip_grad_norm: float | None = None
    ema: Ema | None = None

    def resumable_state(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the model's weights and the RNG."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),  # {} unless fp16: the scale and its growth counter
        }

    def load_resumable_state(self, states: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(states["optimizer"])
        self.schedule.scheduler.load_state_dict(states["scheduler"])
        self.scaler.load_state_dict(states.get("scaler", {}))  # checkpoints from before fp16 hold none


def build_optimization(
    exp: C.Experiment, model: models.Classifier, steps_per_epoch: int, class_counts: dict[str, int]
) -> Optimization:
    """class_counts: training images per class, in label order (data.class_counts)."""
    optimizer = build_optimizer(exp.optimizer, model.parameters())
    schedule = build_scheduler(exp.scheduler, optimizer, exp.train.epochs, steps_per_epoch)
    device = next(model.parameters()).device
    weight = class_weights(exp.train.class_weights, class_counts)
    if weight is not None:
        weight = weight.to(device)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=exp.train.label_smoothing)
    scaler = torch.amp.GradScaler(device.type, enabled=exp.train.precision == "fp16")
    ema = None if exp.train.ema_decay is None else Ema(model, exp.train.ema_decay)
    return Optimization(loss_fn, optimizer, schedule, scaler, exp.train.clip_grad_norm, ema)


def class_weights(cfg: C.ClassWeights, class_counts: dict[str, int]) -> torch.Tensor | None:
    """One weight per class in label order, or None for plain cross-entropy.

    "balanced" is scikit-learn's compute_class_weight("balanced"): n_samples / (n_classes * count).
    A table names classes; an unknown name is refused here, where the classes are known, before training.
    """
    match cfg:
        case "none":
            return None
        case "balanced":
            counts = torch.tensor(list(class_counts.values()), dtype=torch.float64)
            return (counts.sum() / (len(counts) * counts)).float()
        case dict():
            problems = C.class_weight_problems(cfg, list(class_counts))
            if problems:
                raise ConfigError("experiment", problems)
            named = [cfg[name] if name in cfg else 1.0 for name in class_counts]  # unnamed classes weigh 1.0
            return torch.tensor(named, dtype=torch.float32)
        case _:
            assert_never(cfg)


# ---------------------------------------------------------------------------------------- feed


@dataclass
class Feed:
    """What the loop's batches flow through: the whole model on images, or its head on cached features.

    Checkpoints always hold the whole `model`; `net` is the model itself or a part of it that shares
    its parameters, so training `net` trains the model.
    """

    model: models.Classifier
    net: nn.Module
    inputs: runtime.Inputs
    loaders: dict[str, DataLoader]
    feature_cache: bool
    image_loaders: dict[str, DataLoader]  # the images behind `loaders`, whatever `net` eats
    image_inputs: runtime.Inputs
    world: distributed.World = distributed.World()
    ddp: nn.Module | None = None  # `net` under DistributedDataParallel, when the run spans processes: what trains

    @property
    def trained(self) -> nn.Module:
        """What a training step runs: `net`, or its DDP wrapper (evaluation runs `net` itself, rank by rank)."""
        return self.net if self.ddp is None else self.ddp

    def evaluation(self, tta: C.Tta) -> tuple[nn.Module, dict[str, DataLoader], runtime.Inputs]:
        """What the final evaluation runs through: cached features are those of the unmirrored crop,
        so a test-time augmentation takes the whole model on images."""
        if self.feature_cache and tta != "none":
            return self.model, self.image_loaders, self.image_inputs
        return self.net, self.loaders, self.inputs

    def part(self, model: models.Classifier) -> nn.Module:
        """What this feed's batches go through in `model` (the trained one or its average): all of it, or its head."""
        return model.head if self.feature_cache else model

    def judged(self, opt: Optimization) -> nn.Module:
        """The network that validation (and so `best`) judges: the average of the weights when there is one."""
        return self.net if opt.ema is None else self.part(opt.ema.model)


def build_feed(
    exp: C.Experiment, model: models.Classifier, loaders: dict[str, DataLoader], device: torch.device,
    world: distributed.World = distributed.World(),
) -> Feed:
    """Images through the whole model; or, where train.feature_cache applies exactly, the frozen
    backbone's features computed once per split and fed to the head (same batches, same order).
    Across processes the trained network is wrapped in DistributedDataParallel."""
    feed = _feed(exp, model, loaders, device, world)
    if world.distributed:
        # DDP broadcasts rank 0's weights and buffers here, so every rank starts from the same model.
        feed.ddp = DistributedDataParallel(feed.net, device_ids=[device.index] if device.type == "cuda" else None)
    return feed


def _feed(exp: C.Experiment, model: models.Classifier, loaders: dict[str, DataLoader], device: torch.device,
          world: distributed.World) -> Feed:
    inputs = data.inputs(exp, device)
    if not feature_cache_applies(exp):
        return Feed(model, model, inputs, loaders, False, loaders, inputs, world=world)
    cached = {}
    for split_name, loader in loaders.items():
        in_order = data.make_loader(loader.dataset, exp.data.eval_batch_size, "in_order", 0, exp.seed)
        features = cache_features(model.backbone, in_order, inputs)
        batch = exp.data.batch_size if split_name == "train" else exp.data.eval_batch_size
        features_set = data.FeatureSet(features, loader.dataset.split)
        order = exp.data.sampler if split_name == "train" else "in_order"
        cached[split_name] = data.make_loader(features_set, batch, order, 0, exp.seed, world=world)
    to_device = runtime.Inputs(lambda features: features.to(device, non_blocking=True), device, inputs.precision)
    return Feed(model, model.head, to_device, cached, True, loaders, inputs, world=world)


def feature_cache_applies(exp: C.Experiment) -> bool:
    """Exact only when the backbone never changes and every epoch sees the same crop of every image."""
    frozen = not isinstance(exp.model, C.ScratchCNN) and exp.model.freeze_backbone
    return exp.train.feature_cache and frozen and not exp.augment


@torch.no_grad()  # not inference_mode: the head saves these features for its backward pass
def cache_features(backbone: nn.Module, loader: DataLoader, inputs: runtime.Inputs) -> torch.Tensor:
    """One pass of the frozen backbone over a split, in the loader's (unshuffled) order."""
    backbone.eval()
    chunks = []
    for images, _ in loader:
        with inputs.autocast():
            chunks.append(backbone(inputs.prepare(images)))
    return torch.cat(chunks)


# --------------------------------------------------------------------------------------- monitor


@dataclass
class Monitor:
    """Tracks the best epoch and decides early stopping.

    The best checkpoint is the first argmin (val_loss) or argmax (val_acc). Patience counts epochs
    since the last improvement larger than min_delta over the value at that improvement (Keras's
    rule); a NaN is never an improvement.
    """

    mode: Literal["min", "max"]
    patience: int | None = None  # None: never stop early
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = 0
    reference: float | None = None
    bad_epochs: int = 0

    def _better(self, value: float, than: float | None, delta: float) -> bool:
        if not math.isfinite(value):  # a NaN or infinite loss is never an improvement, nor the best
            return False
        if than is None:
            return True
        return value < than - delta if self.mode == "min" else value > than + delta

    def update(self, epoch: int, value: float) -> tuple[bool, bool]:
        """Record one epoch's value; return (is the new best, should training stop)."""
        is_best = self._better(value, self.best, 0.0)
        if is_best:
            self.best, self.best_epoch = value, epoch
        if self._better(value, self.reference, self.min_delta):
            self.reference, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return is_best, self.patience is not None and self.bad_epochs >= self.patience


def build_monitor(exp: C.Experiment) -> Monitor:
    mode = "min" if exp.train.select_best == "val_loss" else "max"
    if exp.early_stopping is None:
        return Monitor(mode)
    return Monitor(mode, exp.early_stopping.patience, exp.early_stopping.min_delta)


# ------------------------------------------------------------------------------------------ loop


@dataclass
class LoopState:
    """What the loop carries between epochs, saved in every last checkpoint for resume."""

    monitor: Monitor
    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> LoopState:
        return cls(**(saved | {"monitor": Monitor(**saved["monitor"])}))


def train_one_epoch(feed: Feed, opt: Optimization, epoch: int, progress: bool) -> dict[str, float]:
    net, loader, device, world = feed.trained, feed.loaders["train"], feed.inputs.device, feed.world
    net.train()
    loader.batch_sampler.set_epoch(epoch)
    n_steps = len(loader)
    losses = torch.zeros(n_steps, device=device)  # kept on device: read every few steps, not every step
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(loader, total=n_steps, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not progress)
    for step, (images, labels) in enumerate(bar):
        x, y = feed.inputs.prepare(images), labels.to(device, non_blocking=True)
        with feed.inputs.autocast():
            logits = net(x)
        if world.distributed:
            loss = _share_of_loss(opt.loss_fn, logits.float(), y, world)
        else:
            loss = opt.loss_fn(logits.float(), y)
        # DDP averages the ranks' gradients, and their shares of the loss add up to the whole batch's:
        # scaled by the world size, the averaged gradient is the whole batch's.
        optimizer_step(feed.model, opt, loss * world.size)
        if opt.schedule.per_batch:
            opt.schedule.scheduler.step()
        losses[step] = loss.detach()
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if step % 10 == 9 or step == n_steps - 1:
            window = world.sum(losses[max(0, step - 9) : step + 1])  # every rank sees the same sums: they stop together
            _check_finite(window, epoch, step - len(window) + 1)
            bar.set_postfix(loss=f"{window.mean().item():.4f}", lr=f"{opt.optimizer.param_groups[0]['lr']:.2e}")
    counts = world.sum(torch.stack([correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)]))
    return {"train_loss": world.sum(losses).mean().item(), "train_acc": counts[0].item() / max(counts[1].item(), 1)}


def _share_of_loss(loss_fn: nn.CrossEntropyLoss, logits: torch.Tensor, y: torch.Tensor, world: distributed.World) -> torch.Tensor:
    """This rank's part of the global batch's mean loss: its summed loss over the whole batch's
    denominator (images, or with class weights their summed weights, as CrossEntropyLoss's mean),
    so the ranks' parts add up to the loss one process computes on the whole batch."""
    total = F.cross_entropy(logits, y, weight=loss_fn.weight, label_smoothing=loss_fn.label_smoothing, reduction="sum")
    here = loss_fn.weight[y].sum() if loss_fn.weight is not None else torch.tensor(float(len(y)), device=logits.device)
    return total / world.sum(here)


def optimizer_step(model: nn.Module, opt: Optimization, loss: torch.Tensor) -> None:
    """Backward, then (fp16) unscale, clip, step, and the average. Without fp16 the scaler's calls are
    pass-throughs, so fp32 and bf16 steps are plain backward + step."""
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scaler.scale(loss).backward()
    if opt.clip_grad_norm is not None:
        opt.scaler.unscale_(opt.optimizer)  # clip the true gradients, not the scaled ones
        trainable = [p for group in opt.optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(trainable, opt.clip_grad_norm)
    opt.scaler.step(opt.optimizer)  # fp16: skipped when a gradient is inf or NaN, and the scale shrinks
    opt.scaler.update()
    if opt.ema is not None:
        opt.ema.update(model)


def _check_finite(window: torch.Tensor, epoch: int, first_step: int) -> None:
    bad = (~torch.isfinite(window)).nonzero()
    if len(bad):
        step = first_step + int(bad[0]) + 1
        raise NonFiniteLoss(
            f"the training loss became {window[int(bad[0])].item()} at epoch {epoch}, step {step}; "
            "no checkpoint holds these weights. Lower optimizer.lr, or check the data"
        )


def step_epoch_scheduler(schedule: Schedule, metrics: dict[str, float]) -> None:
    if schedule.per_batch:
        return
    if schedule.monitor is not None:
        schedule.scheduler.step(metrics[schedule.monitor])
    else:
        schedule.scheduler.step()


def epoch_row(epoch: int, train: dict[str, float], val: dict[str, float], lr: float) -> dict[str, float]:
    return {
        "epoch": epoch,
        "train_loss": train["train_loss"],
        "train_acc": train["train_acc"],
        "val_loss": val["loss"],
        "val_acc": val["accuracy"],
        "val_macro_f1": val["macro_f1"],
        "lr": lr,
    }
