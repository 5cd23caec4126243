"""Temperature scaling of a finished run's checkpoint, fitted on its val split.

`python -m imgcls.calibrate RUN_DIR [--checkpoint best.safetensors] [--tta none|flip]`

Reads the run's own config.toml (start it where the run was started: its data paths may be
relative), computes the val logits through evaluate's forward pass with the run's evaluate.tta
(or --tta), fits T (imgcls.calibration.fit_temperature) and writes RUN_DIR/calibration.json: T, the
val NLL and ECE before and after, the TTA, and the SHA-256 of the checkpoint file. predict and
evaluate apply T to that very file and ignore the calibration, with a warning, for any other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgcls import calibration, config, evaluate
from imgcls.errors import UserError, guarded


def calibrate(run_dir: Path, ckpt_name: str, tta: config.Tta | None) -> calibration.Calibration:
    exp_path, ckpt = run_dir / "config.toml", run_dir / ckpt_name
    if not exp_path.is_file():
        raise UserError(f"{run_dir}: no config.toml; calibrate needs the folder of a finished run")
    trained = evaluate.load_for_inference(str(exp_path), str(ckpt), tta)
    _, logits, labels = evaluate.split_logits(trained, "val")
    if len(labels) == 0:
        raise UserError(f"{trained.exp.data.val_dir}: no val images to fit a temperature on")
    cal = calibration.fit(logits, labels, ckpt, trained.tta)
    calibration.save(cal, run_dir)
    return cal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcls.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run directory (<output.root>/<name>)")
    parser.add_argument("--checkpoint", default="best.safetensors", help="the checkpoint in it to calibrate")
    parser.add_argument("--tta", choices=["none", "flip"], help="test-time augmentation (default: the run's evaluate.tta)")
    args = parser.parse_args(argv)

    def go() -> int:
        cal = calibrate(args.run_dir, args.checkpoint, args.tta)
        print(
            f"calibrated: T={cal.temperature:.4f} on {cal.images} val images (tta {cal.tta})  "
            f"NLL {cal.nll_before:.4f} -> {cal.nll_after:.4f}  ECE {cal.ece_before:.4f} -> {cal.ece_after:.4f}\n"
            f"wrote {args.run_dir / calibration.FILE} for {cal.checkpoint}"
        )
        if not calibration.T_RANGE[0] * 1.01 < cal.temperature < calibration.T_RANGE[1] / 1.01:
            print(
                f"warning: T is at the end of the search range {calibration.T_RANGE}: the NLL kept falling towards it "
                "(a val split the model separates perfectly wants T -> 0); more val images give a meaningful temperature",
                file=sys.stderr,
            )
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
