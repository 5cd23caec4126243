"""`python -m bench [g1 g2 g3 g4 g5 allocator augment cache distributed gpu workers zero_init] [--quick] [--rounds N]
[--json FILE]`

Each comparison runs its contenders interleaved (A, B, A, B, ...) and reports medians, their
ratio and the raw figures as JSON on stdout. Without names, all run (G2 and G3 take tens of
minutes at full size; --quick shrinks every comparison to a smoke test of a few minutes in all).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from bench.common import machine

# name -> (what it compares, "module:function"); each function takes (quick, rounds) and returns
# its figures. Modules are imported only when their comparison runs: some import torch, some sklearn.
COMPARISONS = {
    "g1": ("loop efficiency: imgcls's training epoch and validation vs the bare model", "bench.loop:g1"),
    "g2": ("whole runs: imgcls vs the template's loop on the groceries photos", "bench.template:g2"),
    "g3": ("time to accuracy: scratch CNN on Fashion-MNIST", "bench.fashion:g3"),
    "g4": ("prediction over a folder vs bare forward; cold start vs importing torch", "bench.predict:g4"),
    "g5": ("compute efficiency: bare ResNet18 training vs the conv roof", "bench.loop:g5"),
    "allocator": ("train.allocator: retain vs system, bare scratch CNN in fresh processes", "bench.allocator:compare"),
    "augment": ("crop + flip: the keyed ops' per-image form vs their batched form vs transforms v2, one CPU thread", "bench.augment:compare"),
    "cache": ("decoded cache: peak RSS at N and 4N images, cold vs warm preflight, 2 vs 1 decode processes",
              "bench.cache:measure"),
    "distributed": ("torchrun, 2 processes (gloo) vs 1 process: steady epoch time, and how closely the runs agree",
                    "bench.distributed:compare"),
    "gpu": ("CUDA only: G1 on the GPU (bf16, batch 256) and the keyed ops' batched form there", "bench.gpu:compare"),
    "workers": ("data.num_workers: imgcls's training epoch with 0, 1 and 2 loader workers", "bench.workers:compare"),
    "zero_init": ("model.zero_init_residual: ResNet18 from scratch on the groceries photos, with and without, 3 seeds",
                  "bench.zero_init:compare"),
}


def run_one(name: str, quick: bool, rounds: int) -> dict:
    module, function = COMPARISONS[name][1].split(":")
    return getattr(importlib.import_module(module), function)(quick, rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(COMPARISONS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per comparison (default 3, quick 2)")
    parser.add_argument("--json", dest="json_path", help="also write the results to this file")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in COMPARISONS]
    if unknown:
        parser.error(f"unknown comparison(s) {unknown}; choose from {', '.join(COMPARISONS)}")
    rounds = args.rounds or (2 if args.quick else 3)
    if rounds < 2:
        parser.error("--rounds must be at least 2: one round cannot show the noise")
    from imgcls.runtime import configure_allocator

    configure_allocator("retain")  # imgcls's default, and the same for both sides of every comparison
    results: dict = {"machine": machine(), "quick": args.quick, "rounds": rounds}
    import torch

    every = [n for n in COMPARISONS if n != "gpu" or torch.cuda.is_available()]  # "all" means what this machine can run
    for name in args.names or every:
        print(f"[bench] {name}: {COMPARISONS[name][0]} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results[name] = run_one(name, args.quick, rounds)
        results[name]["bench_seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps({name: results[name]}, indent=1), file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json_path:
        with open(args.json_path, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
