"""train.allocator measured: the bare scratch CNN @128 training in fresh processes, "retain" vs "system".

The setting is process-wide and sticky, so each figure comes from its own process:
`python -m bench.allocator retain|system STEPS` prints images per second.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from bench.common import PYTHON, ROOT, env_for_subprocess, interleaved, ratio


def worker(choice: str, steps: int) -> float:
    from imgcls.runtime import configure_allocator

    configure_allocator(choice)  # first, as imgcls.run does, before any large block exists
    import torch
    from torch import nn

    from imgcls import config, models

    torch.manual_seed(0)
    model = models.scratch_cnn(config.ScratchCNN(arch="scratch_cnn", batch_norm=True), 4).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(32, 3, 128, 128).to(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (32,))
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps: oneDNN's kernel choice, the optimizer's state
            start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * 32 / (time.perf_counter() - start)


def compare(quick: bool, rounds: int) -> dict[str, Any]:
    steps = 4 if quick else 12

    def launch(choice: str) -> float:
        out = subprocess.run(
            [PYTHON, "-m", "bench.allocator", choice, str(steps)], cwd=ROOT, env=env_for_subprocess(),
            check=True, capture_output=True, text=True,
        ).stdout
        return float(out.strip().splitlines()[-1])

    rates = interleaved({"retain": lambda: launch("retain"), "system": lambda: launch("system")}, rounds)
    return {
        "speedup_retain_over_system": ratio(rates["retain"]["median"], rates["system"]["median"]),
        "img_per_s": rates,
        "model": "bare scratch CNN (BatchNorm) @128, batch 32, channels_last fp32",
    }


if __name__ == "__main__":
    print(worker(sys.argv[1], int(sys.argv[2])))
