"""patches/apply.py on the real upstream files: kohya-ss/sd-scripts 48d368fa and the installed lycoris-lora.

The sd-scripts files come from ``../shared/upstream/sd-scripts-48d368fa.tar.gz`` (next to this
repository; see the README there). When it is absent every test here is skipped, saying so, and
fails instead when the environment variable ``CI`` is set (CI always has the archive). LyCORIS is
the installed lycoris-lora, copied: the installed package is never modified.

Upstream code runs in subprocesses (tests/fixtures/upstream/harness.py), because upstream's
top-level ``library`` and ``networks`` packages would collide with ours in this process; modules
this venv lacks (torchvision, cv2, imagesize, voluptuous) get stand-ins there
(tests/fixtures/upstream/standins/), used only while upstream is imported.
"""
import ast
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest_tiny import tiny_sd_path  # noqa: F401  (fixture used by name)
from library.optimizers.registry import list_optimizers
from patches.apply import DEFAULT_ROOT, apply, check, main, revert

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "upstream" / "sd-scripts-48d368fa.tar.gz"
HARNESS = ROOT / "tests" / "fixtures" / "upstream" / "harness.py"
PATCHED = ("library/train_util.py", "train_network.py")


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the archive is expected there)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def upstream_pristine(tmp_path_factory):
    """The archive unpacked once per session (read-only use: tests copy it)."""
    if not ARCHIVE.is_file():
        _unavailable(f"upstream sd-scripts archive not found at {ARCHIVE}; these tests need the real upstream files")
    dest = tmp_path_factory.mktemp("upstream")
    with tarfile.open(ARCHIVE) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: refuse links and paths leaving `dest`
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    return dest / "sd-scripts"


@pytest.fixture
def sd(upstream_pristine, tmp_path, monkeypatch):
    """A fresh copy of upstream sd-scripts for one test."""
    monkeypatch.delenv("HINA_OPTIMIZERS_ROOT", raising=False)
    return Path(shutil.copytree(upstream_pristine, tmp_path / "sd-scripts"))


def installed_lycoris() -> Path:
    spec = importlib.util.find_spec("lycoris")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lycoris-lora is not installed (it is in requirements.txt)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture
def ly(tmp_path):
    """A copy of the installed lycoris package (tmp/ly/lycoris)."""
    return Path(shutil.copytree(installed_lycoris(), tmp_path / "ly" / "lycoris",
                                ignore=shutil.ignore_patterns("__pycache__")))


def snapshot(*dirs):
    return {p: p.read_bytes() for d in dirs for p in sorted(Path(d).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def archive_bytes(rel: str) -> bytes:
    with tarfile.open(ARCHIVE) as tar:
        return tar.extractfile(f"sd-scripts/{rel}").read()


def harness(sd: Path, *argv, timeout=300) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HINA_OPTIMIZERS_ROOT")}
    env["HF_HUB_OFFLINE"] = "1"
    res = subprocess.run([sys.executable, str(HARNESS), *map(str, argv)], cwd=sd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


EXPECTED_BLOCKS = {
    "train_util.py": ["runtime", "get-optimizer"],
    "train_network.py": ["param-names", "report-loss"],
    "kohya.py": ["lycoris-dedup", "lycoris-named"],
}


# ------------------------------------------------------------------------ check / apply / revert
def test_check_on_upstream_lists_every_block_and_writes_nothing(sd, ly, capsys):
    before = snapshot(sd, ly)
    report = check(sd, lycoris=ly)
    assert report.ok, report.format()
    assert [f.status for f in report.files] == ["would patch"] * 3
    assert {f.path.name: [e.block for e in f.edits] for f in report.files} == EXPECTED_BLOCKS
    assert main(["--sd-scripts", str(sd), "--lycoris", str(ly), "--check"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("supported: yes (every anchor found)")
    for block in sum(EXPECTED_BLOCKS.values(), []):
        assert f"block '{block}' " in out
    assert snapshot(sd, ly) == before  # no file, backup or temporary file written


def test_apply_on_upstream_is_idempotent_and_revert_byte_identical(sd, ly, capsys):
    before = snapshot(sd, ly)
    report = apply(sd, lycoris=ly)
    assert sorted(report.changed) == sorted([sd / "library" / "train_util.py", sd / "train_network.py", ly / "kohya.py"])
    for path in report.changed:
        ast.parse(path.read_text(), str(path))  # the patched files are valid Python
    once = snapshot(sd, ly)
    assert apply(sd, lycoris=ly).changed == []  # applying twice = applying once
    assert main(["--sd-scripts", str(sd), "--lycoris", str(ly)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("nothing to do")
    assert snapshot(sd, ly) == once
    assert [f.status for f in check(sd, lycoris=ly).files] == ["already applied"] * 3
    assert main(["--sd-scripts", str(sd), "--lycoris", str(ly), "--check"]) == 0
    assert capsys.readouterr().out.count("status: already applied") == 3
    assert sorted(revert(sd, lycoris=ly).changed) == sorted(report.changed)
    assert snapshot(sd, ly) == before  # byte-identical; backups gone
    for rel in PATCHED:
        assert (sd / rel).read_bytes() == archive_bytes(rel)
    assert (ly / "kohya.py").read_bytes() == (installed_lycoris() / "kohya.py").read_bytes()


# ------------------------------------------------------------------------ where the blocks land
def _train_body(path: Path):
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "NetworkTrainer")
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "train")


def _src(path: Path, node) -> str:
    return ast.get_source_segment(path.read_text(), node)


def test_patched_train_network_blocks_sit_where_they_act(sd):
    apply(sd, lycoris="none")
    path = sd / "train_network.py"
    train = _train_body(path)
    # param-names: the statement right before upstream's get_optimizer call
    i = next(k for k, n in enumerate(train.body) if "train_util.get_optimizer(args, trainable_params)" in _src(path, n))
    assert "hina_attach_param_names(trainable_params, network, args)" in _src(path, train.body[i - 1])
    # report-loss: in the training step, right after optimizer.step(), after the backward pass
    steps = [n for n in ast.walk(train) if isinstance(n, ast.With)
             and _src(path, n.items[0].context_expr) == "accelerator.accumulate(training_model)"]
    assert len(steps) == 1
    body = [_src(path, n) for n in steps[0].body]
    backward = body.index("accelerator.backward(loss)")
    step = body.index("optimizer.step()")
    ours = body[step + 1 : body.index("lr_scheduler.step()")]  # between optimizer.step() and lr_scheduler.step()
    assert backward < step and len(ours) == 2 and "report_loss(loss.detach())" in ours[-1]
    calls = [n for n in ast.walk(train) if isinstance(n, ast.Attribute) and n.attr == "report_loss"]
    assert len(calls) == 1  # the only call: not in the validation loops
    assert path.read_text().count("# >>> hina-optimizers report-loss >>>") == 1


# ------------------------------------------------------------------------ upstream code, patched, running
ALL = [info.name for info in list_optimizers()]


def test_upstream_get_optimizer_builds_every_optimizer_with_names(sd, tiny_sd_path):
    """Every registered optimizer through upstream's NetworkTrainer.train statements (networks.lora,
    prepare_optimizer_params, the param-names block, train_util.get_optimizer), then two steps."""
    apply(sd, lycoris="none")
    out = harness(sd, "optimizers", tiny_sd_path, *ALL, "AdamW")
    assert out["library_path"] == [str(sd / "library"), str(DEFAULT_ROOT / "library")]  # theirs first
    assert out["networks_lora"] == str(sd / "networks" / "lora.py")  # upstream's LoRA, not ours
    for info in list_optimizers():
        got = out["optimizers"][info.name]
        cls = info.load()
        assert got["class"] == got["optimizer_name"] == f"{cls.__module__}.{cls.__name__}", info.name
        assert got["lr_descriptions"] == ["textencoder", "unet"]
        assert got["n_params"] > 0 and got["named"] == got["n_params"] and got["match"], (info.name, got)
        assert got["named_key"] == [True, True]
        assert got["first"][0].startswith("lora_te_") and got["first"][0].endswith(".lora_down.weight")
        assert all(s["finite"] for s in got["steps"]) and got["steps"][-1]["changed"] > 0, (info.name, got["steps"])
    adamw = out["optimizers"]["AdamW"]  # upstream's own branch, groups untouched
    assert adamw["class"] == "torch.optim.adamw.AdamW" and adamw["named_key"] == [False, False]


def test_upstream_lokr_with_lycoris_default_preset_trains(sd, ly, tiny_sd_path):
    """--network_module lycoris.kohya --network_args algo=lokr, lycoris-lora's default preset: the
    unpatched kohya.py fails with "duplicated lora name"; the patched one keeps each layer once and
    HinaAdamWOptimizer trains with every LoKr factor named."""
    installed = installed_lycoris() / "kohya.py"
    installed_hash = hashlib.sha256(installed.read_bytes()).hexdigest()
    apply(sd, lycoris=ly)
    out = harness(sd, "lokr", tiny_sd_path, ly.parent)
    assert out["lycoris"] == str(ly / "kohya.py")  # the patched copy was the one imported
    assert out["unpatched"] == "AssertionError: duplicated lora name: lora_unet_time_embedding_linear_1"
    assert out["kept_once"] == ["hina-optimizers patch: 2 layer(s) targeted twice by the LyCORIS preset, kept once: "
                                "lora_unet_time_embedding_linear_1, lora_unet_time_embedding_linear_2"]
    assert out["unique"] and out["time_embedding"] == ["lora_unet_time_embedding_linear_1",
                                                       "lora_unet_time_embedding_linear_2"]
    assert out["module_types"] == ["LokrModule"]
    assert out["optimizer_name"] == "library.optimizers.hina_adamw.HinaAdamWOptimizer"
    assert out["named"] == out["n_params"] > 0 and out["match"] and out["named_key"] == [True, True]
    assert out["first"][0].endswith(".lokr_w1")
    assert all(s["finite"] for s in out["steps"]) and out["steps"][-1]["changed"] > 0
    assert hashlib.sha256(installed.read_bytes()).hexdigest() == installed_hash  # installed package untouched


def test_upstream_training_step_hands_the_loss_to_coptim(sd, tiny_sd_path):
    """Upstream's training step (the patched `with accelerator.accumulate(training_model):`
    statement) under a real Accelerator, gradient accumulation 2, Automagic_CameAMP_COptim behind
    accelerate's AcceleratedOptimizer: one loss per real update, the update's last micro-batch."""
    apply(sd, lycoris="none")
    out = harness(sd, "report-loss", tiny_sd_path)
    assert out["wrapper"] == "AcceleratedOptimizer"
    assert out["reported_after_each"] == [0, 1, 1, 2, 2, 3]
    assert out["loss_hist"] == pytest.approx(out["losses"][1::2], rel=1e-6)
    assert out["info"] == 3  # get_context_info()["losses_reported"]
