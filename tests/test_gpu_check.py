"""benchmarks/gpu_check.py: its checks run on the CPU (--device cpu --skip-bench, tiny shapes),
its no-GPU message, and that its detectors do fail when they should."""
import contextlib
import io
import re
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check
from library.optimizers.registry import list_optimizers

NAMES = [info.name for info in list_optimizers()]
TINY = [("lora_unet_a.lora_down.weight", (8, 40)), ("lora_unet_a.lora_up.weight", (40, 8)),
        ("lora_unet_b.lora_down.weight", (4, 8, 3, 3)), ("lora_te_c.bias", (16,))]
LINE = re.compile(r"^(PASS|FAIL)  (.+?)(?: \[(.+)\])?: ")


@pytest.fixture(scope="module")
def cpu_run():
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(gpu_check, "SHAPES", TINY)
        code = gpu_check.main(["--device", "cpu", "--skip-bench"])
    status = {}
    for line in out.getvalue().splitlines():
        m = LINE.match(line)
        if m:
            status[(m.group(2), m.group(3))] = m.group(1)
    return code, status, out.getvalue()


def test_cpu_checks_that_must_pass(cpu_run):
    code, status, text = cpu_run
    must = [("parity", "AdaptiveHinaAdamW all off"), ("8bit", "AdaptiveHinaAdamW optim_bits=8 vs 32")]
    must += [(check, name) for name in NAMES for check in ("resume", "bf16 deterministic", "no host sync")]
    must += [("bf16 stochastic rounding", name) for name in gpu_check.HINA]
    must += [("nonfinite", name) for name in NAMES]
    failed = [k for k in must if status.get(k) != "PASS"]
    assert not failed, f"{failed}\n{text}"


def test_cpu_run_reports_every_optimizer_and_its_exit_code(cpu_run):
    code, status, text = cpu_run
    for check in ("resume", "nonfinite", "bf16 deterministic", "no host sync"):
        assert {name for (c, name) in status if c == check} == set(NAMES), check
    assert "no CUDA GPU" not in text and "summary: " in text
    assert code == 0 and "FAIL" not in status.values(), text
    assert re.search(r"max \|diff\| \S+", text)  # parity reports its difference


def test_no_gpu_says_so_and_exits_0(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert gpu_check.main(["--device", "cuda"]) == 0
    assert capsys.readouterr().out.strip() == gpu_check.NO_GPU
    # and as `make gpu-check` runs it (default device: cuda)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU here (torch.cuda.is_available() is False): nothing checked" in proc.stdout


def test_detectors_fail_when_they_should(monkeypatch):
    cpu = torch.device("cpu")
    assert gpu_check.sync_error(cpu, lambda: torch.ones(3).sum().item()) is not None
    assert gpu_check.sync_error(cpu, lambda: torch.ones(3).sum()) is None
    # plain torch AdamW does not skip a NaN gradient: the check must say so
    monkeypatch.setattr(gpu_check, "SHAPES", TINY)
    monkeypatch.setattr(gpu_check, "build", lambda name, params, **kw: torch.optim.AdamW([p for _, p in params]))
    ok, detail = gpu_check.nonfinite_one(cpu, "AdamW")
    assert not ok and "moved to non-finite" in detail and "state changed" in detail
    assert gpu_check.diff_keys({"a": torch.zeros(2), "step": 1}, {"a": torch.zeros(2), "step": 2}) == []
    assert gpu_check.diff_keys({"a": torch.zeros(2)}, {"a": torch.zeros(2, dtype=torch.float64)}) == ["a"]
