"""`python -m bench.preflight [--against REV] [--rounds N]`: the preflight of Fashion-MNIST's 70,000
files (scan, hashing, the warm decoded cache, leakage and near-duplicate checks) and the writing of
its preflight.json, in fresh processes; with --against, the same in a git worktree of REV,
interleaved, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.common import PYTHON, ROOT, interleaved, machine, ratio
from bench.fashion import image_folder

# Runs in the code under test (its own imgcls): prints seconds of prepare and of the report's write,
# the report's size and its warnings.
PROBE = """
import json, sys, tempfile, time
from pathlib import Path
from imgcls import config, data, report
cfg = config.DataConfig(train_dir=sys.argv[1] + "/train", val_dir=sys.argv[1] + "/val", test_dir=sys.argv[1] + "/test",
                        image_size=28, resize_size=28)
start = time.perf_counter()
found = data.prepare(cfg, progress=False)
prepared = time.perf_counter() - start
with tempfile.TemporaryDirectory() as folder:  # an old revision's report can be 300 MB: never left behind
    out = Path(folder) / "preflight.json"
    report.write_json(out, found.report)
    total, size = time.perf_counter() - start, out.stat().st_size
print(json.dumps({"prepare_s": prepared, "total_s": total, "bytes": size, "warnings": found.report["warnings"]}))
"""


def probe(code: Path, folder: Path) -> dict[str, Any]:
    env = dict(os.environ) | {"PYTHONPATH": str(code)}
    out = subprocess.run([PYTHON, "-c", PROBE, str(folder)], cwd=code, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def measure(against: str | None, rounds: int) -> dict[str, Any]:
    folder = image_folder()
    probe(ROOT, folder)  # builds the decoded cache once: both sides then read it warm
    if against is None:
        runs = [probe(ROOT, folder) for _ in range(rounds)]
        return {"this": runs}
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), against], cwd=ROOT, check=True, capture_output=True)
        try:
            probe(other, folder)  # its decoded cache too, where its decoder differs
            last: dict[str, dict] = {}

            def side(code: Path, name: str):
                def go() -> float:
                    last[name] = probe(code, folder)
                    return last[name]["total_s"]
                return go

            times = interleaved({"this": side(ROOT, "this"), against: side(other, against)}, rounds)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=True)
    return {"seconds": times, f"{against} / this": ratio(times[against]["median"], times["this"]["median"]),
            "last": last}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV", help="also time the preflight of this git revision, interleaved")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.against, args.rounds) | {"machine": machine()}, indent=1))


if __name__ == "__main__":
    main()
