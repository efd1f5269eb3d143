"""RefactoredAutomagicCameAMP: seed 004's examples verbatim, config, phases, each regulariser
where it applies (and nowhere else), custom strategies, checkpoints."""
import dataclasses
import io
import logging

import pytest
import torch
from torch import nn

from library.automagic_cameamp_refactored import (
    OptimizerConfig,
    RefactoredAutomagicCameAMP,
    RegularizationStrategy,
    create_full_finetune_optimizer,
    create_lora_optimizer,
)
from library.optimizers.automagic import Automagic_CameAMP
from library.optimizers.automagic_refactored import OptimizationPhase
from library.toy_tasks import LoRATeacher, train_lora_teacher
from tests.helpers import save_load, step_in_lockstep

ALL_OFF = dict(edge_suppression=False, background_regularization=False, lora_rank_penalty=False,
               spatial_awareness=False)


class TinyNet(nn.Module):
    """A model whose forward returns the loss, as in the seed's training loop."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.lora_down = nn.Linear(16, 4, bias=False)
        self.lora_up = nn.Linear(4, 8, bias=False)
        nn.init.zeros_(self.lora_up.weight)
        self.target = torch.randn(8, 16)

    def forward(self, batch):
        x, img = batch
        y = self.lora_up(self.lora_down(x))
        return nn.functional.mse_loss(y, x @ self.target.T) + self.conv(img).pow(2).mean()


def _batches(n=4):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=gen), torch.randn(2, 3, 6, 6, generator=gen)) for _ in range(n)]


# ------------------------------------------------------------ seed 004, verbatim
def test_seed_basic_usage():
    model, dataloader, epochs = TinyNet(), _batches(), 3
    first = model(dataloader[0]).item()
    # LoRA 微調
    optimizer = create_lora_optimizer(
        model.parameters(),
        lr=1e-4,
        warmup_steps=500
    )

    # 訓練迴圈
    for epoch in range(epochs):
        for batch in dataloader:
            optimizer.zero_grad()
            loss = model(batch)
            loss.backward()
            optimizer.step()
    assert model(dataloader[0]).item() < first


def test_seed_custom_config_convenience_and_use_cases(caplog):
    model = TinyNet()
    params = list(model.parameters())
    # 創建自定義配置
    config = OptimizerConfig(
        lr=2e-4,
        warmup_steps=300,
        edge_suppression=True,
        spatial_awareness=True,
        lora_rank_penalty=True,
        verbose=True
    )

    # 創建優化器
    optimizer = RefactoredAutomagicCameAMP(model.parameters(), config)
    assert optimizer.config.lr == 2e-4 and optimizer.param_groups[0]["lr"] == 2e-4

    # LoRA 微調
    lora_optimizer = create_lora_optimizer(params, lr=1e-4, warmup_steps=500)

    # 全量微調
    full_optimizer = create_full_finetune_optimizer(params, lr=5e-5)
    assert lora_optimizer.config.lora_rank_penalty and not lora_optimizer.config.full_finetune
    assert full_optimizer.config.full_finetune and full_optimizer.config.lr == 5e-5

    # 最適合 LoRA 微調的配置
    optimizer = create_lora_optimizer(
        model.parameters(),
        lr=1e-4,
        warmup_steps=500,
        edge_suppression=True,
        spatial_awareness=True
    )
    # 全量微調配置
    optimizer = create_full_finetune_optimizer(
        model.parameters(),
        lr=5e-5,
        warmup_steps=200,
        edge_suppression=False  # 全量微調時可以關閉
    )
    assert not optimizer.config.edge_suppression
    # 針對圖像模型的配置
    config = OptimizerConfig(
        lr=1e-4,
        edge_suppression=True,    # 重要：抑制邊緣過擬合
        frequency_penalty=0.08,   # 增強：抑制高頻噪聲
        spatial_awareness=True,   # 重要：空間感知
        background_regularization=True  # 減少背景過擬合
    )
    # 針對語言模型的配置
    config = OptimizerConfig(
        lr=2e-5,
        lora_rank_penalty=True,   # 重要：低秩結構
        edge_suppression=False,   # 語言模型通常不需要
        spatial_awareness=False,  # 1D 序列不需要空間感知
        warmup_steps=1000        # 語言模型需要更長預熱
    )
    # 啟用詳細輸出
    config = OptimizerConfig(verbose=True)
    optimizer = RefactoredAutomagicCameAMP(model.parameters(), config)
    optimizer.param_groups[0]["verbose_interval"] = 1
    optimizer.defaults["verbose_interval"] = 1
    loss = model(_batches(1)[0])
    loss.backward()
    with caplog.at_level(logging.INFO, logger="library.optimizers.automagic"):
        optimizer.step()
    assert "avg lr" in caplog.text


def test_seed_custom_regularizer_and_checkpoint():
    model = TinyNet()
    calls = []

    class CustomRegularizer(RegularizationStrategy):
        def apply(self, grad, **kwargs):
            # 實現自定義正則化邏輯
            calls.append((kwargs["phase"], tuple(grad.shape)))
            modified_grad = grad.clamp(-1e-3, 1e-3)
            return modified_grad

    # 可以通過繼承擴展功能
    config = OptimizerConfig(lr=1e-4, warmup_steps=4)
    optimizer = RefactoredAutomagicCameAMP(model.parameters(), config, regularizers=[CustomRegularizer()])
    for batch in _batches(3):
        optimizer.zero_grad()
        model(batch).backward()
        optimizer.step()
    assert len(calls) == 3 * 4 and calls[0][0] == OptimizationPhase.WARMUP_EARLY

    # 保存狀態
    checkpoint = {
        'model_state_dict': model.state_dict(),
        'optimizer_state_dict': optimizer.state_dict(),
        'config': optimizer.config.__dict__
    }
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)

    # 載入狀態
    new_optimizer = RefactoredAutomagicCameAMP(model.parameters(), config)
    new_optimizer.load_state_dict(checkpoint['optimizer_state_dict'])
    assert new_optimizer.config == optimizer.config
    assert OptimizerConfig(**checkpoint['config']) == optimizer.config


# ------------------------------------------------------------ config
def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="edge_threshold"):
        OptimizerConfig(edge_threshold=(0.6,))  # the lineage's trailing-comma default bug
    with pytest.raises(ValueError, match="frequency_penalty"):
        OptimizerConfig(frequency_penalty=-0.1)
    with pytest.raises(ValueError, match="spatial_awareness"):
        OptimizerConfig(spatial_awareness="yes please")
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimizerConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        OptimizerConfig(betas=(0.8, 1.5, 0.999))
    with pytest.raises(ValueError, match="rank_interval"):
        OptimizerConfig(rank_interval=0)
    with pytest.raises(ValueError, match="min_lr"):
        OptimizerConfig(min_lr=1e-2, max_lr=1e-3)
    OptimizerConfig(lr=1e-2, max_lr=1e-3)  # an lr outside [min_lr, max_lr] is not an error
    with pytest.raises(ValueError, match="did you mean 'edge_penalty'"):
        RefactoredAutomagicCameAMP([nn.Parameter(torch.zeros(2))], edge_penaltyy=0.1)
    with pytest.raises(ValueError, match="config must be an OptimizerConfig"):
        RefactoredAutomagicCameAMP([nn.Parameter(torch.zeros(2))], config=3)
    with pytest.raises(ValueError, match="RegularizationStrategy"):
        RefactoredAutomagicCameAMP([nn.Parameter(torch.zeros(2))]).add_regularizer(lambda g: g)


def test_config_defaults_are_seed_004s_and_not_shared():
    c = OptimizerConfig()
    assert (c.lr, c.min_lr, c.max_lr, c.warmup_steps) == (1e-3, None, None, 500)
    assert (c.lr_mask_rate, c.lr_mask_floor, c.lr_mask_ceiling, c.lr_bump) == (0.02, 0.1, 10.0, None)
    assert (c.edge_suppression, c.edge_threshold, c.edge_penalty, c.background_regularization) == (True, 0.6, 0.1, True)
    assert (c.lora_rank_penalty, c.rank_penalty_strength, c.low_rank_emphasis) == (True, 0.01, 1.2)
    assert (c.spatial_awareness, c.frequency_penalty, c.detail_preservation, c.verbose) == (True, 0.05, 0.8, False)
    for f in dataclasses.fields(OptimizerConfig):
        assert not isinstance(f.default, (list, dict, set)), f.name
        if f.name not in ("betas", "eps"):
            assert not isinstance(getattr(c, f.name), tuple), f.name
    d = OptimizerConfig(betas=[0.8, 0.99, 0.999])
    assert d.betas == (0.8, 0.99, 0.999) and c.betas == (0.9, 0.999, 0.9999)
    overridden = RefactoredAutomagicCameAMP([nn.Parameter(torch.zeros(2))], c, edge_penalty=0.3)
    assert overridden.config.edge_penalty == 0.3 and c.edge_penalty == 0.1


def test_state_dict_round_trip_restores_config():
    ps = [nn.Parameter(torch.randn(8, 4, 3, 3)), nn.Parameter(torch.randn(6, 5))]
    opt = create_lora_optimizer(ps, lr=2e-4, warmup_steps=7, edge_penalty=0.2, rank_interval=3)
    for _ in range(5):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    sd = save_load(opt.state_dict())
    other = RefactoredAutomagicCameAMP([nn.Parameter(p.detach().clone()) for p in ps])
    other.load_state_dict(sd)
    assert other.config == opt.config and other.config.edge_penalty == 0.2
    assert other.param_groups[0]["warmup_steps"] == 7
    assert isinstance(other.state[other.param_groups[0]["params"][1]]["lowrank_P"], torch.Tensor)


# ------------------------------------------------------------ phases
def test_phase_boundaries_and_scales():
    opt = RefactoredAutomagicCameAMP([nn.Parameter(torch.zeros(2))], warmup_steps=10)
    phases = [opt.phase_of(t) for t in (1, 5, 6, 10, 11, 20, 21, 100)]
    assert phases == ["warmup_early"] * 2 + ["warmup_late"] * 2 + ["stable"] * 2 + ["mature"] * 2
    scales = [opt.regularization_scale(t) for t in (1, 6, 8, 10, 15, 30)]
    assert scales[0] == 0.5 and 0.5 < scales[1] < scales[2] < scales[3] == pytest.approx(0.8)
    assert scales[4] == 0.8 and scales[5] == 0.3
    off = RefactoredAutomagicCameAMP([nn.Parameter(torch.zeros(2))], warmup_steps=10, enable_stage_optimization=False)
    assert off.regularization_scale(1) == off.regularization_scale(30) == 1.0


def test_phases_change_behaviour():
    gen = torch.Generator().manual_seed(0)
    w = 8
    grads = [torch.randn(12, 6, generator=gen) for _ in range(24)]
    p0 = torch.randn(12, 6, generator=gen)

    def run(**kw):
        p = nn.Parameter(p0.clone())
        opt = RefactoredAutomagicCameAMP([p], lr=1e-4, lr_bump=1e-5, warmup_steps=w, **{**ALL_OFF, "use_tam": True},
                                         **kw)
        trace = []
        for g in grads:
            p.grad = g.clone()
            opt.step()
            st = opt.state[p]
            trace.append((p.detach().clone(), st["lr_mask"].float().clone(), float(st["tam_s"])))
        return trace

    staged, flat = run(), run(enable_stage_optimization=False)
    # early warmup: identical to the base behaviour (TAM, OrthoGrad, full bumps)
    for t in range(w // 2):
        assert torch.equal(staged[t][0], flat[t][0])
    # TAM state moves only while 2t <= W
    assert staged[w // 2 - 1][2] != 0.0 and staged[w // 2][2] == staged[-1][2]
    # late warmup: bumps shrink to 0 at t = W; then the mask is frozen in both
    late = [float((staged[t][1] - staged[t - 1][1]).abs().max()) for t in range(w // 2, w)]
    late_flat = [float((flat[t][1] - flat[t - 1][1]).abs().max()) for t in range(w // 2, w)]
    assert late[-1] == 0.0 and late_flat[-1] > 0.0 and late[0] > late[-1]
    assert torch.equal(staged[w][1], staged[-1][1]) and torch.equal(flat[w][1], flat[-1][1])
    # stable/mature: the Cautious mask makes the steps differ
    assert not torch.equal(staged[-1][0], flat[-1][0])


# ------------------------------------------------------------ regularisers: where they apply
SHAPES = {"conv3x3": (6, 4, 3, 3), "linear": (12, 5), "conv1x1": (8, 4, 1, 1), "vector": (7,)}


def _one_step_each(**flags):
    gen = torch.Generator().manual_seed(3)
    ps = {k: nn.Parameter(torch.randn(s, generator=gen) * 0.3) for k, s in SHAPES.items()}
    opt = RefactoredAutomagicCameAMP(list(ps.values()), lr=1e-3, warmup_steps=6, **{**ALL_OFF, "low_rank_emphasis": 1.0,
                                                                                      "rank_decay_boost": 0.0, **flags})
    for _ in range(3):
        for p in ps.values():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return {k: p.detach().clone() for k, p in ps.items()}, opt


@pytest.mark.parametrize(
    "flags, applies",
    [
        (dict(edge_suppression=True, edge_threshold=0.2), {"conv3x3"}),
        (dict(spatial_awareness=True, frequency_penalty=0.0), {"conv3x3"}),
        (dict(spatial_awareness=True, frequency_penalty=0.3), {"conv3x3"}),
        (dict(background_regularization=True, background_threshold=0.8), {"conv3x3"}),
        (dict(lora_rank_penalty=True, rank_penalty_strength=0.5), {"conv3x3", "linear", "conv1x1"}),
        (dict(lora_rank_penalty=True, rank_penalty_strength=0.0, low_rank_emphasis=1.5), {"conv3x3", "linear", "conv1x1"}),
        (dict(lora_rank_penalty=True, rank_penalty_strength=0.0, rank_decay_boost=50.0), {"conv3x3", "linear", "conv1x1"}),
    ],
    ids=["edge", "spatial", "frequency", "background", "rank_penalty", "low_rank_emphasis", "rank_aware_decay"],
)
def test_each_regulariser_acts_only_where_it_means_something(flags, applies):
    base, _ = _one_step_each()
    got, opt = _one_step_each(**flags)
    for k in SHAPES:
        if k in applies:
            assert not torch.equal(got[k], base[k]), k
        else:
            assert torch.equal(got[k], base[k]), k


def test_frequency_penalty_isolated_from_spatial_variance_scaling():
    a, _ = _one_step_each(spatial_awareness=True, frequency_penalty=0.0)
    b, _ = _one_step_each(spatial_awareness=True, frequency_penalty=0.3)
    assert not torch.equal(a["conv3x3"], b["conv3x3"])


def test_low_rank_penalty_lowers_the_tail_of_a_factor():
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(16, 64, generator=gen) * 0.1
    tails = {}
    for strength in (0.0, 2.0):
        p = nn.Parameter(w0.clone())
        opt = RefactoredAutomagicCameAMP([p], lr=1e-3, warmup_steps=1, **{**ALL_OFF, "lora_rank_penalty": True,
                                                                            "rank_penalty_strength": strength,
                                                                            "low_rank_emphasis": 1.0,
                                                                            "rank_decay_boost": 0.0},
                                          enable_stage_optimization=False, weight_decay=0.0)
        g2 = torch.Generator().manual_seed(6)
        for _ in range(60):
            p.grad = torch.randn(16, 64, generator=g2) * 0.01
            opt.step()
        s = torch.linalg.svdvals(p.detach())
        tails[strength] = float(s[8:].sum() / s.sum())
    assert tails[2.0] < 0.9 * tails[0.0]


def test_custom_strategies_run_in_order_and_can_filter_shapes():
    order = []

    class Tag(RegularizationStrategy):
        def __init__(self, tag, only_matrices=False):
            self.tag, self.only = tag, only_matrices

        def applies_to(self, param):
            return param.ndim >= 2 or not self.only

        def apply(self, grad, *, param, state, step, **ctx):
            order.append((self.tag, param.ndim))
            state["calls_" + self.tag] = state.get("calls_" + self.tag, 0) + 1
            return grad * 0.0 if self.tag == "zero" else grad

    ps = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]
    opt = RefactoredAutomagicCameAMP(ps, lr=1e-4, **ALL_OFF, regularizers=[Tag("a"), Tag("b", only_matrices=True)])
    opt.add_regularizer(Tag("zero"))
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert order == [("a", 2), ("b", 2), ("zero", 2), ("a", 1), ("zero", 1)]
    assert opt.state[ps[0]]["calls_b"] == 1 and "calls_b" not in opt.state[ps[1]]
    assert torch.equal(opt.state[ps[0]]["exp_avg"], torch.zeros(4, 3))  # the zeroed gradient reached the update


def test_regularisers_off_equals_the_base_optimizer():
    gen = torch.Generator().manual_seed(7)
    p0 = [torch.randn(s, generator=gen) for s in SHAPES.values()]
    a = [nn.Parameter(x.clone()) for x in p0]
    b = [nn.Parameter(x.clone()) for x in p0]
    ref = RefactoredAutomagicCameAMP(a, lr=1e-3, warmup_steps=4, enable_stage_optimization=False, **ALL_OFF)
    base = Automagic_CameAMP(b, lr=1e-3, warmup_steps=4)
    step_in_lockstep([(ref, a), (base, b)], 10, gen)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_trains_the_lora_teacher_with_everything_on():
    losses, held, _ = train_lora_teacher(lambda named: create_lora_optimizer(named, lr=1e-3, warmup_steps=100), steps=300)
    assert held < 0.3 * losses[0]


def test_diagnostics():
    model = LoRATeacher()
    opt = create_lora_optimizer(model.named_trainable(), lr=1e-4, warmup_steps=10)
    info = opt.get_optimization_info()
    assert info["phase"] == "warmup_early" and info["regularizers"]["low_rank_tensors"] == 4
    assert info["regularizers"]["applied_to_tensors"] == {"lora_rank_penalty": 4}
    assert info["config"]["edge_threshold"] == 0.6
