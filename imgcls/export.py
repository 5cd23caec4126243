"""Export for deployment: a checkpoint as one ONNX file that carries its classes and preprocessing.

`python -m imgcls.export EXP CKPT --format onnx OUT.onnx`

The graph is the model in eval mode (BatchNorm's running statistics, no dropout) in float32, with
imgcls's `Normalize` in front: it takes the uint8 RGB batch (N, 3, image_size, image_size) that
imgcls's eval preparation makes (decode upright, shorter side resize_size, centre crop image_size)
and returns logits (N, classes); N is free. Normalisation inside the graph means a deployment feeds
pixels and cannot get the mean and std wrong. The file's metadata_props say the rest
(`predict.OnnxMetadata`). Before the file is written, its logits on the experiment's val images
are compared with PyTorch's; a file that disagrees is not written and the exit status is 1.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import imgcls
from imgcls import checkpoint, config, data, evaluate, predict, provenance, runtime
from imgcls.errors import UserError, guarded, optional_import

# fp32 on both sides, but onnxruntime's kernels sum in other orders than torch's: logits differed by
# 1.4e-6 on the groceries val images (a one-epoch scratch CNN run at 128) and by 1.3e-6 for an
# untrained ResNet18 at 224 on random images. 1e-3 is far above that and far below the mistakes it
# is for: on the tiny test run, BGR input moved logits by 0.5 (every top class unchanged), and a
# weight tensor off by 0.5 by 4.5.
LOGIT_TOLERANCE = 1e-3


class Deployed(nn.Module):
    """uint8 crops -> logits: imgcls's Normalize, then the classifier."""

    def __init__(self, normalize: nn.Module, model: nn.Module):
        super().__init__()
        self.normalize, self.model = normalize, model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))


@dataclass(frozen=True)
class Parity:
    images: int
    max_logit_difference: float
    agree: int  # images whose top class is the same
    disagree_beyond_ties: int  # of the others, those whose top-2 margin exceeds 2 * tolerance

    @property
    def ok(self) -> bool:
        # A logit error within the tolerance can swap two classes only when their margin is within 2x it.
        return self.max_logit_difference <= LOGIT_TOLERANCE and self.disagree_beyond_ties == 0

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"parity on {self.images} val images: max |logit difference| {self.max_logit_difference:.3g} "
            f"(tolerance {LOGIT_TOLERANCE:g}), top-1 agreement {self.agree / self.images:.2%} "
            f"({self.agree}/{self.images}): {verdict}"
        )


def onnx_model(trained: evaluate.Trained, ckpt_path: str) -> bytes:
    """The checkpoint's model as a serialised ONNX model with imgcls's metadata."""
    exp = trained.exp
    mean, std = data.normalization(exp.data)
    model = trained.model.to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval()
    deployed = Deployed(data.Normalize(mean, std, channels_last=False), model).eval()
    # Two images: an example batch of 1 would let the exporter fix the batch size.
    example = torch.zeros(2, 3, exp.data.image_size, exp.data.image_size, dtype=torch.uint8)
    # The dynamo exporter (onnxscript), not the TorchScript one: that one refuses Normalize's
    # in-place uint8 -> float copy (aten::copy), and this exports imgcls's own module unchanged.
    program = torch.onnx.export(
        deployed, (example,), dynamo=True, verbose=False, optimize=True,
        input_names=[predict.ONNX_INPUT], output_names=[predict.ONNX_OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    proto = program.model_proto
    toml = config.to_toml(exp)
    meta = predict.OnnxMetadata(
        classes=trained.classes, image_size=exp.data.image_size, resize_size=exp.data.resize_size,
        normalize_mean=list(mean), normalize_std=list(std), experiment=toml,
        experiment_sha256=hashlib.sha256(toml.encode()).hexdigest(), checkpoint_sha256=provenance.file_sha256(ckpt_path),
        imgcls_version=imgcls.__version__,
    )
    del proto.metadata_props[:]
    for key, value in meta.props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def parity(onnx_bytes: bytes, trained: evaluate.Trained) -> Parity:
    """The ONNX model against PyTorch (fp32, on the CPU) on every val image, batched by the loader
    training validates with."""
    exp = trained.exp
    reference = runtime.Inputs(data.inputs(exp, torch.device("cpu")).prepare, torch.device("cpu"), "fp32")
    onnx = predict.from_onnx(onnx_bytes, "the exported model")
    _, loader = evaluate.eval_loader(exp.model_copy(update={"device": "cpu"}), "val", exp.data.val_dir, trained.classes)
    images, worst, agree, beyond = 0, 0.0, 0, 0
    for batch, _ in loader:
        want = evaluate.forward(trained.model, batch, reference)
        got = onnx.logits(batch)
        worst = max(worst, float((want - got).abs().max()))
        same = want.argmax(1) == got.argmax(1)
        top2 = want.topk(min(2, want.shape[1]), dim=1).values
        margin = top2[:, 0] - top2[:, -1]
        images, agree = images + len(batch), agree + int(same.sum())
        beyond += int((~same & (margin > 2 * LOGIT_TOLERANCE)).sum())
    return Parity(images, worst, agree, beyond)


def export(exp_path: str, ckpt_path: str, out: Path) -> Parity:
    """Export, check parity, and write `out` only when parity holds."""
    optional_import("onnxscript", "export")  # what torch.onnx's exporter needs; named before any work
    optional_import("onnxruntime", "export")
    trained = evaluate.load_for_inference(exp_path, ckpt_path)
    onnx_bytes = onnx_model(trained, ckpt_path)
    result = parity(onnx_bytes, trained)
    if result.ok:
        checkpoint.atomic_write(out, onnx_bytes)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcls.export", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="the experiment TOML the checkpoint was trained with")
    parser.add_argument("checkpoint", help="a .safetensors checkpoint (e.g. runs/NAME/best.safetensors)")
    parser.add_argument("output", type=Path, help="the file to write, e.g. model.onnx")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="the export format (onnx, the default)")
    args = parser.parse_args(argv)

    def go() -> int:
        if args.output.is_dir():
            raise UserError(f"{args.output}: a folder; give the file to write, e.g. {args.output / 'model.onnx'}")
        result = export(args.experiment, args.checkpoint, args.output)
        print(result.line())
        if not result.ok:
            print(f"error: the exported model disagrees with PyTorch; {args.output} was not written", file=sys.stderr)
            return 1
        print(f"wrote {args.output}")
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
