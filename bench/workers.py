"""data.num_workers: imgcls's steady training epoch with 0, 1 and 2 loader worker processes.

`python -m bench workers [--rounds N] [--quick]`. bench.loop's setting (generated JPEGs, batch 32,
fp32, channels_last), scratch CNN @128 and ResNet18 @224, each with two augment lists: the keyed
ops (random_resized_crop + flip, per image in the loader) and the shipped scratch experiment's list
(+ color_jitter: transforms v2). The three worker counts train the same model side by side,
interleaved; figures are training images per second and each count's ratio to 0 workers.
The schema's default for data.num_workers follows these figures.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from bench.common import interleaved, ratio
from bench.loop import AUGMENT, Contest

AUGMENTS = {
    "keyed": AUGMENT,
    "transforms_v2": AUGMENT + [{"op": "color_jitter", "brightness": 0.2, "contrast": 0.2, "saturation": 0.2}],
}
WORKERS = (0, 1, 2)


def compare(quick: bool, rounds: int) -> dict[str, Any]:
    sizes = {"scratch_cnn@128": (64, 64) if quick else (320, 64), "resnet18@224": (32, 32) if quick else (96, 32)}
    out: dict[str, Any] = {}
    for name, (n_train, n_val) in sizes.items():
        for augment_name, augment in AUGMENTS.items():
            contests = {w: Contest(name, "fp32", n_train, n_val, augment, w) for w in WORKERS}
            for contest in contests.values():
                contest.imgcls_epoch()  # warm-up: workers started, allocator warm
            result = interleaved({f"workers_{w}": contest.imgcls_epoch for w, contest in contests.items()}, rounds)
            for w in WORKERS[1:]:
                result[f"ratio_{w}_over_0"] = ratio(result[f"workers_{w}"]["median"], result["workers_0"]["median"])
            out[f"{name} {augment_name}"] = result
            print(f"[bench] workers {name} {augment_name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return out
