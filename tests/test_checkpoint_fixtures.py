"""Checkpoints written by earlier code load into the current code and resume bit-exactly.

Each file in tests/fixtures/checkpoints/ holds the parameters and ``state_dict()`` an optimizer
had after a few steps, and the parameters it reached a few steps later (see make_checkpoints.py
there). Any change to a technique's math, a state key or a storage format that breaks users'
saved training states fails here.

Bits are reproducible only on a CPU whose fp32 reduction kernels add in the order of the machine
that wrote the files: MKL's dot product and ATen's vectorised sums and norms pick their code
path, and so the grouping of partial sums, from the CPU at run time (neither
``ATEN_CPU_CAPABILITY`` nor ``MKL_CBWR`` reproduced the writer's bits on another machine), so on
another CPU a case whose techniques reduce (norms, dots, cosines) rounds a few values differently
and ends a few fp32 ulps away (measured on an AVX-512 machine against files written on the CI machine: at most 9.4e-7
relative, 3e-8 absolute, after 5 steps). The check is therefore bit-exact where the bits match and,
where they do not, to within ``ULPS_ELSEWHERE``, still far below what a change of a formula, a
state key or a storage format does: scaling the resumed lr by 1.0001 fails every case (a state
key or format change raises on load or moves far more).
"""
import glob
import os

import pytest
import torch

from tests.fixtures.checkpoints import make_checkpoints as fixture

ULPS_ELSEWHERE = dict(rtol=4e-6, atol=1e-7)  # ~32 fp32 ulps: other CPUs' reduction order, nothing more
FILES = sorted(glob.glob(os.path.join(os.path.dirname(fixture.__file__), "*.pt")))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the files were written: reductions in one fixed order
    yield
    torch.set_num_threads(before)


def test_every_case_has_a_file_and_every_registered_optimizer_a_case():
    from library.optimizers.registry import list_optimizers

    names = {os.path.splitext(os.path.basename(f))[0] for f in FILES}
    assert names == set(fixture.CASES)
    assert {info.name for info in list_optimizers()} <= {reg for reg, _ in fixture.CASES.values()}


@pytest.mark.parametrize("path", FILES, ids=lambda f: os.path.splitext(os.path.basename(f))[0])
def test_saved_checkpoint_resumes_bit_exactly(path, one_thread):
    saved = torch.load(path, weights_only=True)
    params = fixture.named_params()
    with torch.no_grad():
        for name, p in params:
            p.copy_(saved["params"][name])
    opt = fixture.build(saved["registry_name"], saved["kwargs"], params)
    opt.load_state_dict(saved["state_dict"])
    fixture.take_steps(opt, params, saved["saved_at"], saved["continue"])
    for name, p in params:
        expected = saved["expected"][name]
        if torch.equal(p.detach(), expected):
            continue
        assert torch.allclose(p.detach(), expected, **ULPS_ELSEWHERE), (
            f"{name}: max difference {float((p.detach() - expected).abs().max()):.3g} after resuming a checkpoint "
            f"written by {saved['written_by'][:10]}"
        )
