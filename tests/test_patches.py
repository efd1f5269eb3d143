"""patches/apply.py: apply, check, revert, idempotence, all-or-nothing, and the patched code.

Works on copies of tests/fixtures/patches (small stand-ins carrying the anchors of sd-scripts'
library/train_util.py and train_network.py, and of LyCORIS' lycoris/kohya.py).
"""
import ast
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from library.optimizers.registry import accepted_kwargs, list_optimizers
from patches.apply import BACKUP_SUFFIX, DEFAULT_ROOT, PatchError, apply, check, main, revert, strip_blocks

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "patches"
PY = sys.executable

# every registered name and alias, resolved at collection time (not hard-coded)
ALL_NAMES = [(info, n) for info in list_optimizers() for n in (info.name, *info.aliases)]


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A copy of the fixtures: (sd-scripts dir, lycoris package dir)."""
    monkeypatch.delenv("HINA_OPTIMIZERS_ROOT", raising=False)
    shutil.copytree(FIXTURES / "sd_scripts", tmp_path / "sd")
    shutil.copytree(FIXTURES / "lycoris", tmp_path / "ly" / "lycoris")
    return tmp_path / "sd", tmp_path / "ly" / "lycoris"


def targets(sd, ly):
    return [sd / "library" / "train_util.py", sd / "train_network.py", ly / "kohya.py"]


def snapshot(*dirs):
    """Every file (path -> bytes) under `dirs`, caches excluded."""
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                out[p] = p.read_bytes()
    return out


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_count = 0


def load_patched_train_util(sd: Path):
    global _count
    _count += 1
    return load(sd / "library" / "train_util.py", f"_fixture_sd_train_util_{_count}")


def ns(optimizer_type, *optimizer_args, lr=1e-3):
    return types.SimpleNamespace(
        optimizer_type=optimizer_type, optimizer_args=list(optimizer_args), learning_rate=lr, use_8bit_adam=False
    )


def lora_groups():
    net = torch.nn.Module()
    net.lora_unet_a = torch.nn.Module()
    net.lora_unet_a.lora_down = torch.nn.Linear(8, 2, bias=False)
    net.lora_unet_a.lora_up = torch.nn.Linear(2, 8, bias=False)
    return net, [{"params": dict(net.named_parameters()).values(), "lr": 1e-3}]


@pytest.fixture
def no_bitsandbytes(monkeypatch):
    """Any `import bitsandbytes` raises ImportError while the test runs."""
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)


# ------------------------------------------------------------------------ check / apply / revert
def test_check_is_a_dry_run_and_names_every_edit(tree, capsys):
    sd, ly = tree
    before = snapshot(sd, ly)
    report = check(sd, lycoris=ly)
    assert report.ok and report.supported
    assert [f.status for f in report.files] == ["would patch"] * 3
    blocks = {f.path.name: [e.block for e in f.edits] for f in report.files}
    assert blocks == {"train_util.py": ["runtime", "get-optimizer"], "train_network.py": ["param-names", "report-loss"],
                      "kohya.py": ["lycoris-dedup", "lycoris-named"]}
    text = report.format(diff=True)
    assert "def get_optimizer(args, trainable_params)" in text and "+    _hina_result = " in text
    assert main(["--sd-scripts", str(sd), "--lycoris", str(ly), "--check", "--diff"]) == 0
    assert "supported: yes" in capsys.readouterr().out
    assert snapshot(sd, ly) == before  # nothing written, no backup, no temp file


def test_apply_then_revert_is_byte_identical(tree):
    sd, ly = tree
    before = snapshot(sd, ly)
    report = apply(sd, lycoris=ly)
    assert sorted(report.changed) == sorted(targets(sd, ly))
    for path in targets(sd, ly):
        text = path.read_text()
        assert "# >>> hina-optimizers " in text and "# <<< hina-optimizers " in text
        backup = path.with_name(path.name + BACKUP_SUFFIX)
        assert backup.read_bytes() == before[path]  # the original bytes are kept
        assert strip_blocks(text)[0].encode() == before[path]
    report = revert(sd, lycoris=ly)
    assert sorted(report.changed) == sorted(targets(sd, ly))
    assert snapshot(sd, ly) == before  # byte-identical, backups and temp files gone
    assert revert(sd, lycoris=ly).changed == []  # reverting a clean tree is a no-op


def test_apply_twice_equals_apply_once(tree, capsys):
    sd, ly = tree
    apply(sd, lycoris=ly)
    once = snapshot(sd, ly)
    assert apply(sd, lycoris=ly).changed == []
    assert main(["--sd-scripts", str(sd), "--lycoris", str(ly)]) == 0
    assert snapshot(sd, ly) == once
    report = check(sd, lycoris=ly)
    assert report.ok and [f.status for f in report.files] == ["already applied"] * 3
    assert main(["--sd-scripts", str(sd), "--lycoris", str(ly), "--check"]) == 0
    capsys.readouterr()


def test_outdated_blocks_are_replaced_not_stacked(tree, tmp_path):
    sd, ly = tree
    other = tmp_path / "elsewhere"  # another checkout of this repository
    for need in ("patches/hina_sdscripts.py", "library/optimizers/registry.py", "networks/names.py"):
        (other / need).parent.mkdir(parents=True, exist_ok=True)
        (other / need).write_text("")
    apply(sd, lycoris=ly, root=other)
    assert repr(str(other)) in (sd / "library" / "train_util.py").read_text()
    assert [f.status for f in check(sd, lycoris=ly).files][0] == "would update outdated blocks"
    apply(sd, lycoris=ly)
    updated = snapshot(sd, ly)
    revert(sd, lycoris=ly)
    apply(sd, lycoris=ly)
    assert snapshot(sd, ly) == updated
    assert (sd / "library" / "train_util.py").read_text().count("# >>> hina-optimizers runtime >>>") == 1


BREAKS = [
    ("library/train_util.py", "    optimizer_type = optimizer_type.lower()\n", "    optimizer_type = optimizer_type.casefold()\n",
     "optimizer_type = optimizer_type.lower()"),
    ("library/train_util.py", "def get_optimizer(args, trainable_params)", "def pick_optimizer(args, trainable_params)",
     "def get_optimizer(args, trainable_params)"),
    ("library/train_util.py", "    optimizer_kwargs = {}\n", "    optimizer_kwargs = dict()\n", "optimizer_kwargs = {}"),
    ("train_network.py", "train_util.get_optimizer(args, trainable_params)", "train_util.make_optimizer(args, trainable_params)",
     "train_util.get_optimizer(args, trainable_params)"),
    ("kohya.py", "    def prepare_optimizer_params(\n", "    def prepare_params(\n", "def prepare_optimizer_params(self, ...)"),
    ("train_network.py", "            accelerator.backward(loss)\n", "            loss.backward()\n", "accelerator.backward(loss)"),
    ("train_network.py", "            optimizer.step()\n", "            optimizer.step(closure=None)\n",
     "optimizer.step() after accelerator.backward(loss)"),
    ("kohya.py", "        self.loras = self.text_encoder_loras + self.unet_loras\n",
     "        self.loras = [*self.text_encoder_loras, *self.unet_loras]\n",
     "self.loras = self.text_encoder_loras + self.unet_loras before the 'duplicated lora name' check"),
]


@pytest.mark.parametrize("rel, old, new, anchor", BREAKS, ids=[b[3][:40] for b in BREAKS])
def test_a_missing_anchor_modifies_nothing(tree, rel, old, new, anchor, capsys):
    sd, ly = tree
    path = ly / rel if rel == "kohya.py" else sd / rel
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    before = snapshot(sd, ly)
    with pytest.raises(PatchError) as err:
        apply(sd, lycoris=ly)
    assert str(path) in str(err.value) and anchor in str(err.value)
    assert snapshot(sd, ly) == before  # the two intact files were not patched either
    report = check(sd, lycoris=ly)
    assert not report.ok and "supported: NO" in report.format()
    assert main(["--sd-scripts", str(sd), "--lycoris", str(ly), "--check"]) == 1
    assert main(["--sd-scripts", str(sd), "--lycoris", str(ly)]) == 1
    assert anchor in capsys.readouterr().err
    assert snapshot(sd, ly) == before


def test_refuses_when_bitsandbytes_is_imported_before_our_insertion_point(tree):
    sd, ly = tree
    tu = sd / "library" / "train_util.py"
    tu.write_text(tu.read_text().replace(
        "    optimizer_kwargs = {}\n", "    import bitsandbytes  # noqa\n\n    optimizer_kwargs = {}\n", 1))
    before = snapshot(sd, ly)
    with pytest.raises(PatchError, match="bitsandbytes"):
        apply(sd, lycoris=ly)
    assert snapshot(sd, ly) == before


def test_missing_file_and_bad_lycoris_path_modify_nothing(tree, tmp_path):
    sd, ly = tree
    before = snapshot(sd, ly)
    with pytest.raises(PatchError, match="kohya.py"):
        apply(sd, lycoris=tmp_path / "nowhere")
    (sd / "train_network.py").rename(sd / "train_network_moved.py")
    before = snapshot(sd, ly)
    with pytest.raises(PatchError, match="train_network.py: file not found"):
        apply(sd, lycoris=ly)
    assert snapshot(sd, ly) == before


def test_lycoris_none_and_auto(tree):
    sd, ly = tree
    report = check(sd, lycoris="none")
    assert [f.path.name for f in report.files] == ["train_util.py", "train_network.py"]
    assert any("skipped" in n for n in report.files[0].notes)
    report = check(sd, lycoris="auto")  # the installed lycoris-lora, or skipped with a note
    assert report.ok


def test_crlf_files_round_trip(tree):
    sd, ly = tree
    path = sd / "train_network.py"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    before = snapshot(sd, ly)
    apply(sd, lycoris=ly)
    data = path.read_bytes()
    assert b"hina-optimizers param-names" in data and data.count(b"\n") == data.count(b"\r\n")
    revert(sd, lycoris=ly)
    assert snapshot(sd, ly) == before


def test_revert_with_a_damaged_marker_uses_the_backup(tree):
    sd, ly = tree
    before = snapshot(sd, ly)
    apply(sd, lycoris=ly)
    path = sd / "train_network.py"
    path.write_text(path.read_text().replace("# <<< hina-optimizers param-names <<<", "# (end marker edited away)"))
    assert not check(sd, lycoris=ly).ok  # apply refuses a damaged file ...
    revert(sd, lycoris=ly)  # ... revert restores it from train_network.py.hina-orig
    assert snapshot(sd, ly) == before


def test_cli_module_entry_point(tree):
    sd, ly = tree
    out = subprocess.run([PY, "-m", "patches.apply", "--sd-scripts", str(sd), "--lycoris", str(ly), "--check"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "would patch" in out.stdout and "supported: yes" in out.stdout


def test_installed_lycoris_kohya_py_anchors(tree, tmp_path):
    """The lycoris-lora installed here (4.1.3 when written): anchors found, revert byte-identical."""
    spec = importlib.util.find_spec("lycoris")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lycoris-lora not installed")
    real = Path(list(spec.submodule_search_locations)[0]) / "kohya.py"
    copy = tmp_path / "installed" / "lycoris" / "kohya.py"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(real, copy)
    sd, _ = tree
    report = check(sd, lycoris=copy)
    assert report.ok, report.format()
    original = copy.read_bytes()
    apply(sd, lycoris=copy)
    assert b"LycorisNetworkKohya.prepare_optimizer_params = _hina_named_param_groups(" in copy.read_bytes()
    revert(sd, lycoris=copy)
    assert copy.read_bytes() == original


# ------------------------------------------------------------------------ the patched code
def _args_for(info):
    """--optimizer_args strings the class accepts, in forms only our parser takes; values are
    the constructor's own defaults (so any registered optimizer can be built with them)."""
    import inspect

    cls = info.load()
    names, _ = accepted_kwargs(cls)
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k in names}
    out = []
    if isinstance(defaults.get("weight_decay"), float):
        out.append(f"weight_decay={defaults['weight_decay']}")
    betas = defaults.get("betas")
    if isinstance(betas, tuple) and len(betas) > 1:
        out.append("betas=" + ",".join(map(str, betas)))  # unquoted tuple
    word = next((k for k in sorted(defaults) if isinstance(defaults[k], str) and defaults[k].isidentifier()), None)
    if word:
        out.append(f"{word}={defaults[word]}")  # unquoted string: upstream's literal_eval fails on it
    flag = next((k for k in sorted(defaults) if defaults[k] is True), None)
    if flag:
        out.append(f"{flag}=true")  # lowercase boolean
    return out


@pytest.mark.parametrize("info, name", ALL_NAMES, ids=[n for _, n in ALL_NAMES])
def test_patched_get_optimizer_builds_every_registered_name(tree, no_bitsandbytes, info, name):
    sd, ly = tree
    apply(sd, lycoris=ly)
    tu = load_patched_train_util(sd)
    cls = info.load()
    opt_args = _args_for(info)
    for spelling in (name, name.lower(), name.upper()):
        _, groups = lora_groups()
        opt_name, args_str, opt = tu.get_optimizer(ns(spelling, *opt_args), groups)
        assert type(opt) is cls
        assert opt_name == f"{cls.__module__}.{cls.__name__}"
        assert opt.param_groups[0]["lr"] == 1e-3
        for item in opt_args:
            assert item.split("=")[0] + "=" in args_str
        for key, value in info.defaults.items():  # e.g. the old fork's ...8bit names
            assert f"{key}={value}" in args_str
    assert sys.modules["bitsandbytes"] is None  # never imported (it would have raised)


def test_patched_get_optimizer_leaves_other_names_to_sd_scripts(tree, no_bitsandbytes):
    sd, ly = tree
    apply(sd, lycoris=ly)
    tu = load_patched_train_util(sd)
    _, groups = lora_groups()
    name, args_str, opt = tu.get_optimizer(ns("AdamW", "weight_decay=0.1"), groups)
    assert type(opt) is torch.optim.AdamW and args_str == "weight_decay=0.1"
    _, groups = lora_groups()
    assert type(tu.get_optimizer(ns("torch.optim.SGD"), groups)[2]) is torch.optim.SGD
    _, groups = lora_groups()
    with pytest.raises(ImportError, match="8bit branch"):  # kohya's own 8bit names still go there
        tu.get_optimizer(ns("AdamW8bit"), groups)


def test_patched_get_optimizer_dotted_path_and_bad_argument(tree):
    sd, ly = tree
    apply(sd, lycoris=ly)
    tu = load_patched_train_util(sd)
    _, groups = lora_groups()
    name, args_str, opt = tu.get_optimizer(
        ns("library.custom_hina_adaptive_adamw_optimizer.AdaptiveHinaAdamW", "spd_anchor=auto"), groups)
    assert name == "library.optimizers.adaptive_hina.AdaptiveHinaAdamW" and args_str == "spd_anchor=auto"
    _, groups = lora_groups()
    with pytest.raises(ValueError, match="did you mean 'weight_decay'"):
        tu.get_optimizer(ns("AdaptiveHinaAdamW", "weight_decy=0.1"), groups)


def test_attach_names_only_for_our_optimizers(tree):
    sd, ly = tree
    apply(sd, lycoris=ly)
    tu = load_patched_train_util(sd)
    net, groups = lora_groups()
    out = tu.hina_attach_param_names(groups, net, ns("hinaadamwoptimizer"))
    assert out[0]["named"] == ["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight"]
    assert [id(p) for p in out[0]["params"]] == [id(p) for p in net.parameters()]
    net, groups = lora_groups()
    assert "named" not in tu.hina_attach_param_names(groups, net, ns("AdamW"))[0]
    net, _ = lora_groups()
    bare = list(net.parameters())  # a network returning bare tensors: one named group
    out = tu.hina_attach_param_names(bare, net, ns("AdaptiveHinaAdamW"))
    assert out[0]["named"] == ["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight"]
    net, groups = lora_groups()
    out, desc = tu.hina_attach_param_names((groups, ["unet"]), net, ns("AdaptiveHinaAdamW"))
    assert desc == ["unet"] and len(out[0]["named"]) == 2


def test_patched_lycoris_groups_carry_names(tree):
    sd, ly = tree
    plain = load(ly / "kohya.py", "_fixture_lycoris_plain").create_network()
    groups, desc = plain.prepare_optimizer_params(None, 1e-4, 1e-4)
    assert all("named" not in g for g in groups)
    apply(sd, lycoris=ly)
    kohya = load(ly / "kohya.py", "_fixture_lycoris_patched")
    for applied in (True, False):  # names also before apply_to() registered the modules
        net = kohya.LycorisNetworkKohya()
        if applied:
            net.apply_to()
        groups, desc = net.prepare_optimizer_params(5e-5, 1e-4, 1e-4)
        assert desc == ["textencoder", "unet"]
        table = {f"{m.lora_name}.{n}": p for m in net.text_encoder_loras + net.unet_loras for n, p in m.named_parameters()}
        for g in groups:
            assert isinstance(g["params"], list) and len(g["named"]) == len(g["params"])
            assert all(table[n] is p for n, p in zip(g["named"], g["params"]))
        assert groups[1]["named"][0] == "lora_unet_attn0_to_v.lokr_w1"
    # wrapping is done once even if the module body runs again
    assert kohya.LycorisNetworkKohya.prepare_optimizer_params._hina_named



def test_patched_lycoris_keeps_one_module_per_layer(tree, caplog):
    """A preset naming one layer twice (lycoris-lora 4.x's default on an SD U-Net) no longer fails
    the constructor's duplicate check; two layers sharing a name still do."""
    sd, ly = tree
    twice = [("lora_unet_attn1_to_v", True)]
    plain = load(ly / "kohya.py", "_fixture_lycoris_dup_plain")
    with pytest.raises(AssertionError, match="duplicated lora name: lora_unet_attn1_to_v"):
        plain.LycorisNetworkKohya(extra=twice)
    apply(sd, lycoris=ly)
    kohya = load(ly / "kohya.py", "_fixture_lycoris_dup_patched")
    caplog.set_level("WARNING")
    net = kohya.LycorisNetworkKohya(extra=twice)
    assert [m.lora_name for m in net.unet_loras] == ["lora_unet_attn0_to_v", "lora_unet_attn1_to_v"]
    assert net.loras == net.text_encoder_loras + net.unet_loras
    assert "kept once: lora_unet_attn1_to_v" in caplog.text
    caplog.clear()
    kohya.LycorisNetworkKohya()  # nothing twice: no message
    assert "kept once" not in caplog.text
    with pytest.raises(AssertionError, match="duplicated lora name: lora_unet_attn1_to_v"):
        kohya.LycorisNetworkKohya(extra=[("lora_unet_attn1_to_v", False)])  # another layer, same name


def test_lycoris_without_a_duplicate_check_gets_no_dedup_block(tree):
    sd, ly = tree
    path = ly / "kohya.py"
    text = path.read_text()
    check_lines = text[text.index("        # assertion\n"):text.index("    def apply_to(self):")]
    path.write_text(text.replace(check_lines, "\n"))
    report = check(sd, lycoris=ly)
    assert report.ok and [e.block for e in report.files[2].edits] == ["lycoris-named"]


class _Accelerator:
    """Just enough of accelerate.Accelerator for the fixture's train_step: gradient accumulation."""

    def __init__(self, steps):
        self.steps, self.calls, self.sync_gradients = steps, 0, False

    @contextlib.contextmanager
    def accumulate(self, model):
        self.calls += 1
        self.sync_gradients = self.calls % self.steps == 0
        yield

    def backward(self, loss):
        loss.backward()


class _Wrapped:
    """Like accelerate's AcceleratedOptimizer: steps only on sync, the real one is `.optimizer`."""

    def __init__(self, optimizer, accelerator, skipped=False):
        self.optimizer, self.accelerator, self.step_was_skipped = optimizer, accelerator, skipped

    def step(self):
        if self.accelerator.sync_gradients and not self.step_was_skipped:
            self.optimizer.step()

    def zero_grad(self, set_to_none=True):
        if self.accelerator.sync_gradients:
            self.optimizer.zero_grad(set_to_none=set_to_none)


def fixture_trainer(sd: Path):
    """NetworkTrainer of the (patched) fixture train_network.py, without its `library` import."""
    path = sd / "train_network.py"
    tree = ast.parse(path.read_text())
    tree.body = [n for n in tree.body if not (isinstance(n, ast.Import) and n.names[0].name.startswith("library"))]
    ns = {"__name__": "_fixture_train_network"}
    exec(compile(tree, str(path), "exec"), ns)
    return ns["NetworkTrainer"]()


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "unpatched"])
def test_patched_train_step_reports_the_loss_once_per_update(tree, patched):
    from library.optimizers.automagic import Automagic_CameAMP_COptim

    sd, ly = tree
    if patched:
        apply(sd, lycoris=ly)
    trainer = fixture_trainer(sd)
    w = torch.nn.Parameter(torch.ones(4))
    accelerator = _Accelerator(steps=2)
    optimizer = _Wrapped(Automagic_CameAMP_COptim([w], lr=1e-2), accelerator)
    scheduler = types.SimpleNamespace(step=lambda: None)
    losses = [trainer.train_step(accelerator, None, optimizer, scheduler, lambda i=i: (w * (i + 1)).square().sum())
              for i in range(6)]
    ctx = optimizer.optimizer.param_groups[0]["context"]
    if not patched:  # upstream: nothing reports the loss
        assert ctx["n_loss"] == 0
        return
    assert ctx["n_loss"] == 3  # once per real update (every 2nd micro-step), not per micro-step
    assert torch.equal(ctx["loss_hist"][:3], torch.stack([losses[1], losses[3], losses[5]]).detach())
    optimizer.step_was_skipped = True  # e.g. fp16 overflow: no update, no loss
    for _ in range(2):
        trainer.train_step(accelerator, None, optimizer, scheduler, lambda: w.square().sum())
    assert ctx["n_loss"] == 3
    plain = _Wrapped(torch.optim.SGD([w], lr=1e-2), accelerator)  # optimizers without report_loss: untouched
    trainer.train_step(accelerator, None, plain, scheduler, lambda: w.square().sum())

_FLOW = textwrap.dedent(
    """
    import json, sys, types

    class NoBitsandbytes:  # records and refuses every attempt to import bitsandbytes
        attempts = []

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "bitsandbytes":
                self.attempts.append(name)
                raise ImportError("bitsandbytes is blocked in this test")

    sys.meta_path.insert(0, NoBitsandbytes())
    sys.path.insert(0, sys.argv[1])      # the fixture lycoris package first
    import train_network
    import library, networks
    out = {"library_path_before": list(library.__path__)}
    for module, opt in [("networks.tiny_lora", "HinaAdamWOptimizer"), ("networks.tiny_lora", "hinaadaptiveadamw8bit"),
                        ("lycoris.kohya", "ADAPTIVEHINAADAMW"), ("networks.tiny_lora", "AdamW")]:
        args = types.SimpleNamespace(network_module=module, network_dim=4 if "tiny" in module else 16,
                                     optimizer_type=opt, optimizer_args=["weight_decay=0.01"],
                                     learning_rate=1e-3, text_encoder_lr=5e-4, unet_lr=None, use_8bit_adam=False)
        network, optimizer, name, descriptions = train_network.NetworkTrainer().build(args)
        table = {id(p): n for n, p in network.named_parameters()}
        got = [[getattr(optimizer, "param_name", lambda p: None)(p) for p in g["params"]] for g in optimizer.param_groups]
        want = [[table[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        out[opt] = {"name": name, "got": got, "want": want, "descriptions": descriptions,
                    "named_key": ["named" in g for g in optimizer.param_groups]}
    out["networks_path"] = [str(p) for p in networks.__path__]
    out["library_path"] = list(library.__path__)
    out["bitsandbytes"] = NoBitsandbytes.attempts
    print(json.dumps(out))
    """
)


def test_patched_train_network_flow_hands_names_to_the_optimizer(tree):
    """End to end in a fresh process whose `library` and `networks` are the checkout's own."""
    sd, ly = tree
    apply(sd, lycoris=ly)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HINA_OPTIMIZERS_ROOT")}
    res = subprocess.run([PY, "-c", _FLOW, str(ly.parent)], cwd=sd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["library_path_before"] == [str(sd / "library")]
    assert out["library_path"] == [str(sd / "library"), str(DEFAULT_ROOT / "library")]  # theirs first
    assert out["networks_path"] == [str(sd / "networks")]  # sd-scripts' networks untouched
    assert out["bitsandbytes"] == []  # not even for the ...8bit alias
    for opt in ("HinaAdamWOptimizer", "hinaadaptiveadamw8bit", "ADAPTIVEHINAADAMW"):
        assert out[opt]["name"].startswith("library.optimizers."), out[opt]
        assert out[opt]["got"] == out[opt]["want"] and all(n for g in out[opt]["got"] for n in g)
    assert out["ADAPTIVEHINAADAMW"]["descriptions"] == ["textencoder", "unet"]
    assert out["AdamW"]["name"] == "torch.optim.adamw.AdamW"
    assert out["AdamW"]["named_key"] == [False, False]  # other optimizers get untouched groups
