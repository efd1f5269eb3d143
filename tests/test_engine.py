"""The engine contract: state in self.state, exact round trips, names, errors, no host sync."""

import pytest
import torch

from library.optimizers.adaptive_hina import AdaptiveHinaAdamW
from library.optimizers.engine import HinaOptimizer
from tests.helpers import forbid_host_sync, quadratic_params, run_quadratic, save_load, step_in_lockstep


def make(params, **kw):
    kw.setdefault("warmup_steps", 4)
    kw.setdefault("relationship_discovery_interval", 3)
    return AdaptiveHinaAdamW(params, lr=1e-2, **kw)


def test_state_lives_in_self_state_only():
    params = quadratic_params()
    opt = make(params)
    run_quadratic(opt, params, 5)
    sd = opt.state_dict()
    assert set(sd["state"]) == {0, 1, 2}
    for st in sd["state"].values():
        assert {"step", "exp_avg", "exp_avg_sq", "lr_mask", "tam_s", "importance", "lr_factor"} <= set(st)
    # nothing per-parameter is kept in attributes keyed by id()
    for v in vars(opt).values():
        if isinstance(v, dict):
            assert not any(isinstance(k, int) and k > 10_000 for k in v)


def test_round_trip_keeps_dtypes_and_weights_only_load():
    params = quadratic_params()
    opt = make(params)
    run_quadratic(opt, params, 3)
    opt.state[params[0]]["codes"] = torch.arange(40, dtype=torch.uint8).reshape(8, 5)
    opt.state[params[0]]["flags"] = torch.tensor([True, False])
    sd = save_load(opt.state_dict())
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = make(params2)
    opt2.load_state_dict(sd)
    for p, q in zip(params, params2):
        for k, v in opt.state[p].items():
            w = opt2.state[q][k]
            if isinstance(v, torch.Tensor):
                assert w.dtype == v.dtype, k
                assert w.device == q.device
                assert torch.equal(w, v), k
            else:
                assert w == v
    assert opt2.state[params2[0]]["codes"].dtype == torch.uint8
    assert opt2.state[params2[0]]["lr_mask"].dtype == opt.state[params[0]]["lr_mask"].dtype


def test_fp32_state_of_bf16_params_is_not_cast_on_load():
    p = torch.nn.Parameter(torch.randn(16, 4).to(torch.bfloat16))
    opt = make([p])
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = make([q])
    opt2.load_state_dict(save_load(opt.state_dict()))
    assert opt2.state[q]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])
    # torch's own loader would have cast it
    ref = torch.optim.AdamW([torch.nn.Parameter(q.detach().clone())])
    sd = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(16, 4), "exp_avg_sq": torch.zeros(16, 4)}},
          "param_groups": ref.state_dict()["param_groups"]}
    ref.load_state_dict(sd)
    assert next(iter(ref.state.values()))["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("n", [1, 3, 4, 7])
def test_bit_exact_continuation(n):
    """N steps, save, load into a fresh optimizer, N more == 2N straight (mid-warmup, across intervals)."""
    a = quadratic_params()
    opt_a = make(a)
    run_quadratic(opt_a, a, 2 * n, seed=5)

    b = quadratic_params()
    opt_b = make(b)
    gen_seed = 5
    # first half with the same data stream: replay the same generator
    gen = torch.Generator().manual_seed(gen_seed)
    targets = [torch.randn(p.shape, generator=gen) for p in b]

    def steps(opt, ps, k):
        for _ in range(k):
            opt.zero_grad(set_to_none=True)
            loss = sum(((p - t) ** 2).sum() + 0.1 * (p * torch.randn(p.shape, generator=gen)).sum() for p, t in zip(ps, targets))
            loss.backward()
            opt.step()

    steps(opt_b, b, n)
    sd = save_load(opt_b.state_dict())
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    opt_c = make(c)
    opt_c.load_state_dict(sd)
    steps(opt_c, c, n)
    for x, y in zip(a, c):
        assert torch.equal(x, y)


def test_params_without_grad_and_empty_groups():
    p, q, r = quadratic_params(shapes=((4, 4), (3,), (2, 2)))
    opt = make([{"params": [p, q]}, {"params": [r]}])
    p.grad = torch.randn_like(p)
    opt.step()  # q has no grad, group 2 has none at all
    assert q not in opt.state and r not in opt.state
    sd = save_load(opt.state_dict())
    p2, q2, r2 = (torch.nn.Parameter(t.detach().clone()) for t in (p, q, r))
    opt2 = make([{"params": [p2, q2]}, {"params": [r2]}])
    opt2.load_state_dict(sd)
    assert q2 not in opt2.state
    p2.grad = p.grad.clone()
    q2.grad = torch.randn_like(q2)
    opt2.step()


def test_layout_mismatch_is_a_clear_error():
    params = quadratic_params()
    opt = make(params)
    run_quadratic(opt, params, 2)
    sd = save_load(opt.state_dict())
    with pytest.raises(ValueError, match="param group 0 has 2 parameters"):
        make(quadratic_params()[:2]).load_state_dict(sd)
    with pytest.raises(ValueError, match="param groups"):
        ps = quadratic_params()
        make([{"params": ps[:1]}, {"params": ps[1:]}]).load_state_dict(sd)
    other = [torch.nn.Parameter(torch.zeros(5, 8)), torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(3, 4, 2, 2))]
    opt3 = make([("a.weight", other[0]), ("a.bias", other[1]), ("c.weight", other[2])])
    with pytest.raises(ValueError, match=r"exp_avg' of parameter a\.weight has shape \(8, 5\)"):
        opt3.load_state_dict(sd)
    with pytest.raises(ValueError, match="not an optimizer state dict"):
        opt3.load_state_dict({"foo": 1})


def test_names_from_every_source():
    lin = torch.nn.Linear(3, 2)
    native = make(list(lin.named_parameters()))
    assert native.param_name(lin.weight) == "weight" and native.param_name(lin.bias) == "bias"
    named = make([{"params": [lin.weight, lin.bias], "named": ["w", "b"]}])
    assert named.param_name(lin.bias) == "b"
    dv = make([{"params": {"x": lin.weight}.values(), "named": ["x"]}])  # kohya hands dict_values
    assert dv.param_name(lin.weight) == "x"
    late = make(list(lin.parameters()))
    assert not late.has_names()
    assert late.set_param_names(dict(lin.named_parameters())) == 2
    assert late.param_name(lin.weight) == "weight"
    assert late.set_param_names([("w2", lin.weight)]) == 1
    assert late.param_name(lin.weight) == "w2"
    nameless = make(list(lin.parameters()))
    lin.weight.grad = torch.ones_like(lin.weight)
    nameless.step()
    with pytest.raises(ValueError, match="'named' has 1 names for 2 parameters"):
        make([{"params": [lin.weight, lin.bias], "named": ["w"]}])


def test_names_survive_state_dict():
    lin = torch.nn.Linear(3, 2)
    opt = make(list(lin.named_parameters()))
    sd = save_load(opt.state_dict())
    assert sd["param_groups"][0]["param_names"] == ["weight", "bias"]


def test_sparse_gradients_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = make([("emb.weight", emb.weight)])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients .*emb.weight"):
        opt.step()


def test_no_host_sync_inside_step():
    params = quadratic_params()
    opt = make(params, use_orthogonal_grad=True, allora_eta=1.0)
    for i in range(8):  # crosses warmup and several discovery intervals
        for p in params:
            p.grad = torch.randn_like(p)
        with forbid_host_sync():
            opt.step()
    # and the check itself works
    with pytest.raises(AssertionError):
        with forbid_host_sync():
            torch.ones(()).item()


def test_base_class_is_a_torch_optimizer():
    assert issubclass(AdaptiveHinaAdamW, HinaOptimizer)
    assert issubclass(HinaOptimizer, torch.optim.Optimizer)
    p = torch.nn.Parameter(torch.ones(3))
    opt = make([p])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert opt.param_groups[0]["base_lr"] == pytest.approx(1e-2)
    del sched
    with pytest.raises(ValueError, match="empty parameter list"):
        make([])


def test_closure_is_called_with_grad_enabled():
    p = torch.nn.Parameter(torch.ones(3))
    opt = make([p])

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure)) == pytest.approx(3.0)


def _chunked_run(build, chunk: int, steps: int = 6) -> list[torch.Tensor]:
    """The parameters after ``steps`` steps of ``build``'s optimizer with chunks of ``chunk`` elements."""
    params = quadratic_params(seed=3, shapes=((8, 5), (5,), (3, 4, 2, 2), (16, 4), (4, 16), (7,)))
    opt = build(params)
    opt.chunk_elements = {"cpu": chunk}  # this instance only
    step_in_lockstep([(opt, params)], steps, torch.Generator().manual_seed(4))
    return [p.detach().clone() for p in params]


def _chunk_builders():
    from library.optimizers.automagic import Automagic_CameAMP, Automagic_CameAMP8bit
    from library.optimizers.hina_adamw import HinaAdamWOptimizer

    return {
        "AdaptiveHinaAdamW": lambda ps: AdaptiveHinaAdamW(ps, lr=1e-2, warmup_steps=3, use_grams=True,
                                                          use_orthogonal_grad=True),
        "HinaAdamWOptimizer(no alora)": lambda ps: HinaAdamWOptimizer(ps, lr=1e-2, use_alora=False),
        "Automagic_CameAMP": lambda ps: Automagic_CameAMP(ps, warmup_steps=4, use_tam=True, use_hypergrad=True),
        "Automagic_CameAMP8bit": lambda ps: Automagic_CameAMP8bit(ps, warmup_steps=4),  # a stream per tensor
    }


@pytest.mark.parametrize("name", list(_chunk_builders()))
def test_chunk_size_changes_speed_not_bits(name):
    """chunk_elements bounds how many elements one multi-tensor pass covers: where every tensor of a
    group steps with the same scale, each ends with the same bits whether the group is one chunk or
    one chunk per tensor."""
    build = _chunk_builders()[name]
    whole = _chunked_run(build, 1 << 20)
    split = _chunked_run(build, 1)
    for a, b in zip(whole, split):
        assert torch.equal(a, b)
    assert not torch.equal(whole[0], quadratic_params(seed=3, shapes=((8, 5),))[0])  # it trained


def test_chunk_boundaries_decide_the_rounding_where_scales_differ():
    """What a change of the CPU chunk size does to resumed runs (docs/optimizers.md, "Speed"): with
    per-tensor scales that differ (HinaAdamWOptimizer's LoRA+-style ratio on the up factor of a
    shape-discovered pair, with its default hypergradient factor), a chunk folds decay into the step
    by the uniform or the general formula depending on its neighbours (``_fold_decay_``): the same
    math, rounded differently, a few ulps at most."""
    from library.optimizers.hina_adamw import HinaAdamWOptimizer

    whole = _chunked_run(lambda ps: HinaAdamWOptimizer(ps, lr=1e-2), 1 << 20)
    split = _chunked_run(lambda ps: HinaAdamWOptimizer(ps, lr=1e-2), 1)
    assert not all(torch.equal(a, b) for a, b in zip(whole, split))
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_state_saved_before_chunk_layouts_resumes_with_the_old_layout():
    """AdaptiveHinaAdamW's chunk layout (tensor order, chunk size) decides the 8-bit state's
    stochastic-rounding streams, so a state keeps the layout it was written with: new optimizers
    bring same-sized tensors together (``chunk_layout`` 2, saved in the param groups); a state
    saved without the key (older versions) resumes in parameter order with 2^18-element chunks,
    exactly as it was trained."""
    shapes = ((8, 5), (5,), (8, 5), (3, 4), (5,), (3, 4))  # sizes interleaved: the layouts differ

    def build(layout=None):
        params = quadratic_params(seed=5, shapes=shapes)
        opt = AdaptiveHinaAdamW(params, lr=1e-2, optim_bits=8)
        if layout is not None:
            opt.param_groups[0]["chunk_layout"] = layout
        return opt, params

    assert build()[0].state_dict()["param_groups"][0]["chunk_layout"] == 2
    old, old_params = build(layout=1)  # trained as an older version did
    step_in_lockstep([(old, old_params)], 3, torch.Generator().manual_seed(6))
    saved = old.state_dict()
    del saved["param_groups"][0]["chunk_layout"]  # what an older version saved
    resumed, resumed_params = build()
    with torch.no_grad():
        for a, b in zip(resumed_params, old_params):
            a.copy_(b)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["chunk_layout"] == 1
    gen = torch.Generator().manual_seed(7)
    step_in_lockstep([(resumed, resumed_params)], 3, gen)

    through, through_params = build(layout=1)
    new, new_params = build()
    gens = (torch.Generator().manual_seed(6), torch.Generator().manual_seed(7))
    for gen, steps in zip(gens, (3, 3)):
        step_in_lockstep([(through, through_params), (new, new_params)], steps, gen)
    assert all(torch.equal(a, b) for a, b in zip(resumed_params, through_params))
    assert not all(torch.equal(a, b) for a, b in zip(new_params, through_params))  # the layout matters


def test_chunk_layouts_agree_bit_for_bit_in_32_bits_where_scales_are_uniform():
    """Bringing same-sized tensors together (chunk_layout 2) changes which tensors share a chunk,
    not what a tensor computes: with fp32 state and one scale for every tensor the two layouts
    end with the same bits (only 8-bit streams and mixed-scale decay folding depend on it)."""
    shapes = ((8, 5), (5,), (8, 5), (3, 4), (5,), (3, 4))
    runs = []
    for layout in (1, 2):
        params = quadratic_params(seed=5, shapes=shapes)
        opt = AdaptiveHinaAdamW(params, lr=1e-2, warmup_steps=3, use_grams=True)
        opt.param_groups[0]["chunk_layout"] = layout
        step_in_lockstep([(opt, params)], 6, torch.Generator().manual_seed(8))
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert not torch.equal(runs[0][0], quadratic_params(seed=5, shapes=shapes)[0])  # it trained
