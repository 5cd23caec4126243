"""G1 (loop efficiency), G5 (compute efficiency): imgcls's own loop against the bare model.

imgcls side: the real pipeline (data.prepare, models.build, data.build_loaders, train.train_one_epoch,
evaluate.logits_of) on generated JPEGs. Bare side: the same model's forward, backward and
step over one fixed tensor of the same shape, dtype and memory format, so the ratio is what the
loop, the data path and the bookkeeping cost on top of the model itself.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from torch import nn

from bench.common import generated_folder, interleaved, ratio
from imgcls import config, data, evaluate, models, runtime, train

# (name, model section, image side, generated JPEG size): the two models the targets name.
MODELS = {
    "scratch_cnn@128": ({"arch": "scratch_cnn", "batch_norm": True}, 128, (200, 150)),
    "resnet18@224": ({"arch": "resnet18", "weights": "none"}, 224, (340, 256)),
}
AUGMENT = [{"op": "random_resized_crop", "scale": [0.35, 1.0]}, {"op": "horizontal_flip"}]
BATCH, EVAL_BATCH = 32, 128


def experiment(model: dict, size: int, precision: str, root, augment: list[dict] = AUGMENT, num_workers: int = 0,
               device: str = "cpu", batch: int = BATCH) -> config.Experiment:
    return config.validate(
        {
            "name": "bench",
            "device": device,
            "data": {"train_dir": f"{root}/train", "val_dir": f"{root}/val", "image_size": size,
                     "batch_size": batch, "eval_batch_size": EVAL_BATCH, "num_workers": num_workers},
            "augment": augment,
            "model": model,
            "train": {"precision": precision},
        }
    )


class Contest:
    """One model and precision, set up twice: inside imgcls, and bare on a fixed tensor."""

    def __init__(self, name: str, precision: str, n_train: int, n_val: int, augment: list[dict] = AUGMENT,
                 num_workers: int = 0, device: str = "cpu", batch: int = BATCH):
        model_cfg, size, jpeg = MODELS[name]
        root = generated_folder(f"{name.replace('@', '_')}_{n_train}_{n_val}", 4, {"train": n_train // 4, "val": n_val // 4}, jpeg)
        self.exp = exp = experiment(model_cfg, size, precision, root, augment, num_workers, device, batch)
        self.device, self.batch = torch.device(device), batch
        torch.manual_seed(0)
        self.dataset = data.prepare(exp.data, progress=False)
        self.model = models.build(exp.model, 4, self.device, exp.train.channels_last)
        self.loaders = data.build_loaders(exp, self.dataset)
        self.opt = train.build_optimization(exp, self.model, len(self.loaders["train"]),
                                            data.class_counts(self.dataset.splits["train"], self.dataset.classes))
        inputs = data.inputs(exp, self.device)
        self.feed = train.Feed(self.model, self.model, inputs, self.loaders, False, self.loaders, inputs)
        self.loss_fn = nn.CrossEntropyLoss()
        self.epoch = 0
        fmt = torch.channels_last if exp.train.channels_last else torch.contiguous_format
        self.bare = models.build(exp.model, 4, self.device, exp.train.channels_last)
        self.bare_optimizer = train.build_optimizer(exp.optimizer, self.bare.parameters())
        # The bare side's one resident batch (on the device: nothing crosses the bus per step).
        self.x = torch.randn(batch, 3, size, size, device=self.device).to(memory_format=fmt)
        self.y = torch.randint(0, 4, (batch,), device=self.device)
        self.x_eval = torch.randn(EVAL_BATCH, 3, size, size, device=self.device).to(memory_format=fmt)
        self.n_train = len(self.loaders["train"]) * batch
        self.n_val = len(self.dataset.splits["val"].paths)

    def imgcls_epoch(self) -> float:
        self.epoch += 1
        return self.n_train / self._seconds(lambda: train.train_one_epoch(self.feed, self.opt, self.epoch, progress=False))

    def bare_train(self) -> float:
        steps = len(self.loaders["train"])
        self.bare.train()

        def train_steps() -> None:
            for _ in range(steps):
                with runtime.autocast(self.device, self.exp.train.precision):
                    logits = self.bare(self.x)
                loss = self.loss_fn(logits.float(), self.y)
                self.bare_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.bare_optimizer.step()

        return steps * self.batch / self._seconds(train_steps)

    def imgcls_eval(self) -> float:
        return self.n_val / self._seconds(lambda: evaluate.logits_of(self.model, self.loaders["val"], self.feed.inputs))

    def bare_eval(self) -> float:
        self.bare.eval()
        batches = -(-self.n_val // EVAL_BATCH)

        def forwards() -> None:
            with torch.inference_mode(), runtime.autocast(self.device, self.exp.train.precision):
                for _ in range(batches):
                    self.bare(self.x_eval).float()

        return batches * EVAL_BATCH / self._seconds(forwards)

    def ratios(self, rounds: int) -> dict[str, Any]:
        """After a warm-up, imgcls's training epoch and validation against the bare model, interleaved."""
        self.imgcls_epoch(), self.bare_train(), self.imgcls_eval(), self.bare_eval()
        fit = interleaved({"imgcls": self.imgcls_epoch, "bare": self.bare_train}, rounds)
        val = interleaved({"imgcls": self.imgcls_eval, "bare": self.bare_eval}, rounds)
        return {"train_ratio": ratio(fit["imgcls"]["median"], fit["bare"]["median"]),
                "eval_ratio": ratio(val["imgcls"]["median"], val["bare"]["median"]),
                "train_img_per_s": fit, "eval_img_per_s": val}

    def _seconds(self, fn) -> float:
        """Wall time of fn, the device's queued work included (a GPU runs behind the Python that feeds it)."""
        start = time.perf_counter()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def g1(quick: bool, rounds: int, models: list[str] | None = None, precisions: list[str] | None = None) -> dict[str, Any]:
    """imgcls's steady epoch / bare training, and validation / bare forward, in images per second."""
    out: dict[str, Any] = {"target": ">= 0.95 (training and validation)", "batch": BATCH, "augment": AUGMENT}
    sizes = {"scratch_cnn@128": (128, 128) if quick else (320, 256), "resnet18@224": (32, 32) if quick else (96, 128)}
    for name in models or list(MODELS):
        for precision in precisions or ["fp32", "bf16"]:
            contest = Contest(name, precision, *sizes[name])
            out[f"{name} {precision}"] = contest.ratios(rounds) | {"train_images": contest.n_train, "val_images": contest.n_val}
            print(f"[bench] g1 {name} {precision}: {json.dumps(out[f'{name} {precision}'])}", file=sys.stderr, flush=True)
    return out


def resnet18_train_flops(size: int = 224) -> float:
    """Forward + backward FLOPs per image of ResNet18, counted by torch's own FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    x = torch.randn(2, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def g5(quick: bool, rounds: int) -> dict[str, Any]:
    """Bare ResNet18@224 fp32 training against the conv roof: a big 3x3 conv's GFLOP/s, same run."""
    flops = resnet18_train_flops()
    model = models.build(experiment(MODELS["resnet18@224"][0], 224, "fp32", "unused").model, 1000, torch.device("cpu"), True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(BATCH, 3, 224, 224).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (BATCH,))
    steps = 2 if quick else 4
    conv = nn.Conv2d(128, 128, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    a = torch.randn(BATCH, 128, 56, 56).to(memory_format=torch.channels_last)
    conv_flops = 2 * BATCH * 128 * 56 * 56 * 128 * 9

    def roof() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(steps * 2):
                conv(a)
            return conv_flops * steps * 2 / (time.perf_counter() - start) / 1e9

    def bare() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return flops * BATCH * steps / (time.perf_counter() - start) / 1e9

    roof(), bare()  # warm-up: oneDNN picks and caches its kernels on first use
    figures = interleaved({"conv_roof": roof, "resnet18_train": bare}, rounds)
    return {
        "target": ">= 0.70",
        "ratio": ratio(figures["resnet18_train"]["median"], figures["conv_roof"]["median"]),
        "gflop_per_s": figures,
        "resnet18_train_gflop_per_image": round(flops / 1e9, 3),
        "resnet18_train_img_per_s": round(figures["resnet18_train"]["median"] * 1e9 / flops, 2),
        "roof_conv": f"3x3 conv 128->128 on ({BATCH}, 128, 56, 56), channels_last fp32, forward",
        "step_breakdown": step_breakdown(model, optimizer, x, y, flops * BATCH),
    }


# torch profiler op names -> the parts of a training step the breakdown reports.
PARTS = {
    "conv forward": ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution"),
    "conv backward": ("aten::convolution_backward", "aten::mkldnn_convolution_backward"),
    "batch norm": ("aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::_batch_norm_impl_index"),
}


def step_breakdown(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, step_flops: float) -> dict[str, Any]:
    """Where one bare training step's time goes (torch profiler, self CPU time), and the GFLOP/s of
    the convolutions alone: forward FLOPs are a third of the step's, backward two thirds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    seconds = {part: sum(self_us.get(op, 0) for op in ops) / 2e6 for part, ops in PARTS.items()}
    seconds["everything else"] = total / 2e6 - sum(seconds.values())
    return {
        "share_of_step": {part: round(s * 2e6 / total, 3) for part, s in seconds.items()},
        "conv_forward_gflop_per_s": round(step_flops / 3 / seconds["conv forward"] / 1e9, 1),
        "conv_backward_gflop_per_s": round(step_flops * 2 / 3 / seconds["conv backward"] / 1e9, 1),
        "note": "profiler self time; the conv shares include oneDNN's layout reorders inside those ops",
    }
