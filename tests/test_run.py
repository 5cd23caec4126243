"""imgcls.run end to end, the whole path a user walks: run an experiment through the command line,
then evaluate and predict with its checkpoint; `--dry-run` and a finished run that is never overwritten."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from PIL import Image

from imgcls import config, run, rundir
from imgcls.errors import ConfigError, UserError
from spec.strategies import experiments
from imgcls.evaluate import load_for_inference, split_logits
from imgcls.run import main as run_main

from .fixtures import CLASSES, cli_env, experiment, make_data, make_shapes_data, shapes_overrides

pytestmark = pytest.mark.slow


def imgcls(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    # cli_env: this checkout's imgcls, not whichever one the environment has installed.
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=env or cli_env())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = make_shapes_data(root)
    exp = experiment(root, shapes_overrides(data, root / "runs", epochs=4), "tiny.toml")
    result = imgcls("imgcls.run", str(exp), cwd=root)
    assert result.returncode == 0, result.stderr
    return root, exp, root / "runs" / "tiny", result


def test_run_directory_holds_every_result_file(finished_run):
    _, _, run_dir, _ = finished_run
    for name in (
        "config.toml", "metrics.json", "history.csv", "curves.png", "confusion_matrix_val.png",
        "confusion_matrix_test.png", "reliability_val.png", "reliability_test.png", "classification_report.txt", "best.safetensors", "last.safetensors",
        "manifest.json", "preflight.json", "timings.json", "predictions_val.csv", "predictions_test.csv", "report.html",
    ):
        assert (run_dir / name).is_file(), name
    for png in run_dir.glob("*.png"):
        with Image.open(png) as img:
            assert img.size[0] > 100 and img.size[1] > 100


def test_metrics_are_consistent_with_the_data(finished_run):
    _, _, run_dir, _ = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["classes"] == ["circle", "square", "triangle"]
    for split, n in (("val", 12), ("test", 12)):
        m = metrics[split]
        assert sum(map(sum, m["confusion_matrix"])) == n == m["images"]
        diagonal = sum(m["confusion_matrix"][i][i] for i in range(3))
        assert m["accuracy"] == pytest.approx(diagonal / n)
        assert sum(c["support"] for c in m["per_class"].values()) == n
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"] == 4
    # Three colour-coded shapes: a few epochs are far better than the 1/3 chance rate.
    assert metrics["val"]["accuracy"] >= 0.75


def test_history_has_one_row_per_epoch_and_best_epoch_is_the_argmin(finished_run):
    _, _, run_dir, _ = finished_run
    rows = list(csv.DictReader((run_dir / "history.csv").open()))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    losses = [float(r["val_loss"]) for r in rows]
    assert metrics["best_epoch"] == losses.index(min(losses)) + 1
    assert metrics["val"]["loss"] == pytest.approx(min(losses), rel=1e-5)


def test_resolved_config_revalidates_and_redumps_identically(finished_run):
    _, exp_path, run_dir, _ = finished_run
    text = (run_dir / "config.toml").read_text()
    resolved = config.loads(text)
    assert config.to_toml(resolved) == text
    assert resolved.device == "cpu"
    original = config.load(exp_path)
    assert resolved == original


def test_evaluate_cli_reproduces_the_runs_test_metrics(finished_run):
    root, exp, run_dir, _ = finished_run
    result = imgcls("imgcls.evaluate", str(exp), str(run_dir / "best.safetensors"), "--split", "test", "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert json.loads(result.stdout)["confusion_matrix"] == metrics["test"]["confusion_matrix"]
    assert json.loads(result.stdout)["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-6)
    assert json.loads(result.stdout)["ece"] == pytest.approx(metrics["test"]["ece"], rel=1e-6)


def test_predict_top_class_matches_evaluate_for_each_image(finished_run):
    root, exp, run_dir, _ = finished_run
    ckpt = run_dir / "best.safetensors"
    result = imgcls("imgcls.predict", str(exp), str(ckpt), str(root / "data" / "val"), "--json", "--top-k", "3", cwd=root)
    assert result.returncode == 0, result.stderr
    predicted = {r["path"]: r["top"] for r in json.loads(result.stdout)}
    loaded = load_for_inference(str(exp), str(ckpt))
    paths, logits, _ = split_logits(loaded, "val")
    assert sorted(predicted) == sorted(paths)
    for path, row in zip(paths, logits):
        top = predicted[path]
        assert top[0]["class"] == loaded.classes[int(row.argmax())]
        assert top[0]["probability"] == pytest.approx(float(row.softmax(0).max()), abs=1e-5)
        assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-5)


def test_predict_writes_csv(finished_run):
    root, exp, run_dir, _ = finished_run
    image = next((root / "data" / "test" / "square").glob("*.png"))
    result = imgcls("imgcls.predict", str(exp), str(run_dir / "best.safetensors"), str(image), "--csv", cwd=root)
    assert result.returncode == 0, result.stderr
    (row,) = list(csv.DictReader(result.stdout.splitlines()))
    assert row["path"] == str(image) and row["class1"] in ("circle", "square", "triangle")


# Class folder names that once crashed a run after training, so that metrics.json was never written:
# mathtext with an unknown command, bytes that are not UTF-8, a line break, one letter in two normalisations.
HOSTILE_CLASSES = ("$\\undefinedcommand$", os.fsdecode(b"caf\xe9"), "line\nbreak", "e\u0301", "\u00e9")


def test_a_run_whose_class_folders_have_hostile_names_writes_every_result(tmp_path, monkeypatch):
    make_data(tmp_path, train=4, val=2, classes=HOSTILE_CLASSES)
    monkeypatch.chdir(tmp_path)
    exp_path = experiment(tmp_path, {"train": {"epochs": 1}})
    assert run_main([str(exp_path), "--quiet"]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["classes"] == sorted(HOSTILE_CLASSES)  # exact, the non-UTF-8 byte included
    for name in ("predictions_val.csv", "classification_report.txt", "history.csv"):
        (run_dir / name).read_bytes().decode("utf-8")  # strict: valid UTF-8
    Image.open(run_dir / "confusion_matrix_val.png").verify()


def test_a_finished_run_is_never_overwritten(finished_run):
    root, exp, run_dir, _ = finished_run
    before = (run_dir / "metrics.json").read_bytes()
    result = imgcls("imgcls.run", str(exp), cwd=root)
    assert result.returncode == 2
    assert "finished run" in result.stderr and "Traceback" not in result.stderr
    assert (run_dir / "metrics.json").read_bytes() == before


def test_dry_run_reads_no_images(tmp_path):
    data = make_shapes_data(tmp_path)
    for image in data.rglob("*.png"):
        image.write_bytes(b"not an image: a dry run never decodes")
    exp = experiment(tmp_path, shapes_overrides(data, tmp_path / "runs"), "e.toml")
    result = imgcls("imgcls.run", str(exp), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert config.loads(result.stdout).name == "tiny"
    assert not (tmp_path / "runs").exists()


def test_dry_run_and_config_check_report_every_path_problem_with_the_schema_problems(tmp_path):
    """Missing folders are found before a run starts, in the same report as the schema's problems."""
    overrides = shapes_overrides(tmp_path / "nowhere", tmp_path / "runs")
    exp = experiment(tmp_path, overrides | {"data": overrides["data"] | {"batch_size": 0}}, "e.toml")
    for command in (["imgcls.run", str(exp), "--dry-run"], ["imgcls.config", str(exp)]):
        result = imgcls(*command, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "4 problems" in result.stderr, result.stderr
        for key in ("data.batch_size", "data.train_dir", "data.val_dir", "data.test_dir"):
            assert f"  - {key}: " in result.stderr, (key, result.stderr)


def test_preflight_records_which_path_transforms_each_split(finished_run):
    """The tiny experiment's random_crop + flip take the keyed ops, for training and evaluation
    alike, in their per-image form on the CPU; it is recorded."""
    _, _, run_dir, result = finished_run
    preflight = json.loads((run_dir / "preflight.json").read_text())
    keyed = "keyed ops, per image"  # on the CPU; the batched form is picked for training on a GPU
    assert preflight["transforms"] == {"train": keyed, "val": keyed, "test": keyed}
    assert f"train: 36 images, {keyed}" in result.stderr


def result_files(run_dir: Path) -> dict[str, str]:
    volatile = {"timings.json", rundir.LOCK}  # wall-clock facts, and whom the folder belonged to
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.iterdir()) if p.name not in volatile}


@pytest.mark.parametrize("workers", [0, 2])
def test_two_runs_of_one_experiment_write_byte_identical_files(tmp_path, workers):
    """Everything but timings.json is a function of (experiment, data, seed, machine): two processes
    running one experiment file on copies of one data set write the same bytes."""
    hashes = []
    for name in ("a", "b"):
        base = make_data(tmp_path / name)
        exp = experiment(base, {"data": {"num_workers": workers, "test_dir": "data/val"} | {"val_dir": "data/val2"}})
        shutil.copytree(base / "data" / "val", base / "data" / "val2")
        result = imgcls("imgcls.run", str(exp), cwd=base)
        assert result.returncode == 0, result.stderr
        hashes.append(result_files(base / "runs" / "tiny"))
    assert {"best.safetensors", "last.safetensors", "config.toml", "metrics.json", "history.csv", "manifest.json",
            "preflight.json", "predictions_val.csv", "predictions_test.csv", "report.html"} <= hashes[0].keys()
    assert hashes[0] == hashes[1]


# ------------------------------------------------------------------- the schema accepts what runs


# Same family, same code path, a fraction of the weights to initialise.
SMALL_ARCH = {"resnet34": "resnet18", "resnet50": "resnet18", "mobilenet_v3_large": "mobilenet_v3_small",
              "convnext_tiny": "efficientnet_b0"}


def runnable(drawn: dict) -> dict:
    """A drawn experiment shrunk to seconds: tiny images, batches, widths and one epoch (two with a
    warm-up, cut to one epoch), on the CPU, with no weights to download, small archs, and class weights renamed
    to the tiny data's classes. Every other value (seed, augment parameters, optimizer, schedule,
    precision, ...) is kept as drawn: those are what must either run or be refused by the schema."""
    exp = copy.deepcopy(drawn)
    data = exp["data"]
    data["image_size"] = min(data["image_size"], 40)
    if "resize_size" in data:
        data["resize_size"] = min(data["resize_size"], 48)
    for key in ("batch_size", "eval_batch_size"):
        if key in data:
            data[key] = min(data[key], 6)
    data["num_workers"] = min(data.get("num_workers", 0), 1)
    if data.get("decode_workers") not in (None, "auto"):
        data["decode_workers"] = min(data["decode_workers"], 2)
    model = exp["model"]
    if model["arch"] != "scratch_cnn":  # the smallest arch of each kind: every field but the arch is kept
        model["arch"] = SMALL_ARCH.get(model["arch"], model["arch"])
        model["weights"] = "none"
    else:
        model["channels"] = [min(c, 8) for c in model.get("channels", [8, 8])][:3]
        model["hidden"] = min(model.get("hidden", 8), 16)
    exp["device"] = "cpu"
    warmup = min(exp.get("scheduler", {}).get("warmup_epochs", 0), 1)
    if warmup:
        exp["scheduler"]["warmup_epochs"] = warmup
    exp["train"] = exp.get("train", {}) | {"epochs": 1 + warmup}  # a warm-up must leave one epoch after it
    weights = exp["train"].get("class_weights")
    if isinstance(weights, dict):  # the drawn weights, on the tiny data's class names
        exp["train"]["class_weights"] = dict(zip(CLASSES, weights.values()))
    return exp


@settings(max_examples=int(os.environ.get("IMGCLS_FUZZ_EXAMPLES", 8)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(drawn=experiments())
def test_every_experiment_the_schema_accepts_runs_or_is_refused_cleanly(tmp_path_factory, drawn):
    """Drawn from the schema's own strategies, each experiment that validates finishes a tiny run
    or is refused with a user error; never a traceback from NumPy, torchvision or torch."""
    base = make_data(tmp_path_factory.mktemp("fuzz"), train=4, val=2)
    exp = runnable(drawn)
    exp["data"] |= {"train_dir": str(base / "data/train"), "val_dir": str(base / "data/val")}
    exp["data"].pop("test_dir", None)
    exp["data"]["cache_dir"] = str(base / "cache")  # a drawn folder name would land in the current folder
    exp["output"] = {"root": str(base / "runs")}
    try:
        validated = config.validate(exp)
    except ConfigError:
        assume(False)  # shrunk to tiny sizes, an op no longer fits the image: not a case to run
    try:
        results = run.run(validated, progress=False)
    except UserError as e:
        assert "Traceback" not in str(e)
        return
    assert results["val"]["images"] == 4


# ------------------------------------------------------------------------------------ --smoke


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder below folder, with each file's SHA-256: what a smoke run must not change."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder" for p in sorted(folder.rglob("*"))}


def offline_env(torch_home: Path) -> dict[str, str]:
    """An empty torch hub cache, and downloads refused at once, whatever this machine can reach."""
    refused = "http://127.0.0.1:9"
    return cli_env(TORCH_HOME=str(torch_home), https_proxy=refused, http_proxy=refused, HTTPS_PROXY=refused, HTTP_PROXY=refused)


def smoke_cli(exp: Path, cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    import time

    begun = time.monotonic()
    result = imgcls("imgcls.run", str(exp), "--smoke", cwd=cwd, env=env, timeout=300)
    return result, time.monotonic() - begun


def test_smoke_runs_the_whole_path_in_a_folder_it_removes_and_changes_nothing(tmp_path):
    make_data(tmp_path, train=6, val=6)
    exp = experiment(tmp_path, {"train": {"epochs": 30}, "scheduler": {"warmup_epochs": 2}})
    (tmp_path / "runs" / "older").mkdir(parents=True)
    (tmp_path / "runs" / "older" / "metrics.json").write_text("{}")
    cache = Path(os.environ["HOME"]) / ".cache" / "imgcls"  # the default data.cache_dir
    before = snapshot(tmp_path) | snapshot(cache)

    result, seconds = smoke_cli(exp, tmp_path, offline_env(tmp_path / "torch"))

    assert result.returncode == 0, result.stderr
    assert snapshot(tmp_path) | snapshot(cache) == before  # output.root, the data and the decoded cache
    assert "epoch 1/1" in result.stderr and "train: 8 images" in result.stderr and "val: 8 images" in result.stderr, result.stderr
    written = result.stdout.split("wrote ")[1].splitlines()[0].split(", ")
    assert {"report.html", "metrics.json", "best.safetensors", "predictions_val.csv", "manifest.json"} <= set(written)
    assert "smoke: predict data/val/cat/0.png: " in result.stdout, result.stdout
    folder = result.stdout.split("its folder ")[1].split()[0]
    assert folder.startswith(tempfile.gettempdir()) and not os.path.exists(folder)
    assert seconds < 60, seconds


def test_the_smoke_copy_is_the_experiment_on_the_first_images_for_one_epoch(tmp_path, monkeypatch):
    make_data(tmp_path, train=6, val=5)
    monkeypatch.chdir(tmp_path)
    exp = config.load(experiment(tmp_path, {"scheduler": {"warmup_epochs": 2}}))
    small = run.smoke_experiment(exp, tmp_path / "smoke")
    assert (small.train.epochs, small.scheduler.warmup_epochs) == (1, 0)
    assert small.output.root == str(tmp_path / "smoke" / "runs") and small.data.cache_dir == str(tmp_path / "smoke" / "cache")
    for split, count in (("train", 6), ("val", 5)):
        root = Path(getattr(small.data, f"{split}_dir"))
        for cls in CLASSES:
            links = sorted(p.name for p in (root / cls).iterdir())
            assert links == sorted(sorted(f"{i}.png" for i in range(count))[: run.SMOKE_IMAGES])
            assert all((root / cls / name).resolve() == (tmp_path / "data" / split / cls / name).resolve() for name in links)
    unchanged = ("train", "data", "output", "scheduler")
    assert small.model_dump(exclude=set(unchanged)) == exp.model_dump(exclude=set(unchanged))


SHIPPED = sorted((Path(__file__).resolve().parent.parent / "experiments").rglob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_smoke_of_each_shipped_experiment(path, tmp_path):
    """On generated shapes in place of the groceries photos; ImageNet weights cannot be had offline,
    and those runs stop with the message that says where to put them."""
    data = make_shapes_data(tmp_path)
    tree = config.read(path)
    tree["data"] |= {"train_dir": str(data / "train"), "val_dir": str(data / "val"), "test_dir": str(data / "test")}
    exp = tmp_path / path.name
    exp.write_text(config.to_toml(config.validate(tree)))
    result, seconds = smoke_cli(exp, tmp_path, offline_env(tmp_path / "torch"))
    if tree["model"].get("weights") == "imagenet":
        assert result.returncode == 2, result.stderr
        assert "needs torchvision's resnet18 weights" in result.stderr and str(tmp_path / "torch") in result.stderr
        assert "Traceback" not in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert "smoke: predict" in result.stdout
    assert not (tmp_path / "runs").exists()
    assert seconds < 60, seconds
