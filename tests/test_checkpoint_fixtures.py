"""Checkpoints written by earlier code load into the current code and resume bit-exactly.

Each file in tests/fixtures/checkpoints/ holds the parameters and ``state_dict()`` an optimizer
had after a few steps, and the parameters it reached a few steps later (see make_checkpoints.py
there). Any change to a technique's math, a state key or a storage format that breaks users'
saved training states fails here.
"""
import glob
import os

import pytest
import torch

from tests.fixtures.checkpoints import make_checkpoints as fixture

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
        assert torch.equal(p.detach(), expected), (
            f"{name}: max difference {float((p.detach() - expected).abs().max()):.3g} after resuming a checkpoint "
            f"written by {saved['written_by'][:10]}"
        )
