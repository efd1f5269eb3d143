"""RefactoredAutomagicCameAMP: configuration, phases, regularisers, a custom strategy, checkpoints.

What it shows (CPU, a few seconds):
1. ``create_lora_optimizer`` / ``OptimizerConfig`` + ``RefactoredAutomagicCameAMP`` (seed 004's API);
2. which built-in regulariser runs on which tensor: the image-space ones (edge, frequency,
   spatial, background) only on 3x3 conv kernels, the low-rank one on every matrix view,
   nothing on vectors;
3. the four phases (warmup_early, warmup_late, stable, mature) and the regularisation
   scale of each;
4. a custom ``RegularizationStrategy`` that keeps its own counter in the optimizer state;
5. a checkpoint with the config, loaded into a fresh optimizer: the config comes back and
   both runs continue bit-identically.

See docs/automagic.md. Run from the repository root:

    python docs/examples/automagic_refactored_example.py
"""
from __future__ import annotations

import io
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from library.automagic_cameamp_refactored import (  # noqa: E402
    OptimizerConfig,
    RefactoredAutomagicCameAMP,
    RegularizationStrategy,
    create_lora_optimizer,
)


class LoConAndLoRA(nn.Module):
    """A LoCon pair on a 3x3 conv (down (r, c, 3, 3), up (c, r, 1, 1)) and a LoRA pair on a
    linear layer (down (r, in), up (out, r)), with a trainable bias; the base layers are implicit."""

    def __init__(self, seed: int = 0, c: int = 16, r: int = 4):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_lora_down = nn.Conv2d(c, r, 3, padding=1, bias=False)
        self.conv_lora_up = nn.Conv2d(r, c, 1, bias=True)
        self.lin_lora_down = nn.Linear(c, r, bias=False)
        self.lin_lora_up = nn.Linear(r, c, bias=False)
        nn.init.zeros_(self.conv_lora_up.weight)
        nn.init.zeros_(self.lin_lora_up.weight)

    def forward(self, img):
        h = img + self.conv_lora_up(self.conv_lora_down(img))
        v = h.mean(dim=(2, 3))
        return v + self.lin_lora_up(self.lin_lora_down(v))


def batches(seed: int, c: int = 16):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(c, c, 3, 3, generator=gen) * 0.05
    while True:
        img = torch.randn(4, c, 8, 8, generator=gen)
        target = img + nn.functional.conv2d(img, k, padding=1)
        yield img, target.mean(dim=(2, 3))


def train(model, opt, data, steps: int) -> float:
    loss = torch.zeros(())
    for _ in range(steps):
        img, y = next(data)
        loss = nn.functional.mse_loss(model(img), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


class ClipGradRMS(RegularizationStrategy):
    """Custom strategy: cap the RMS of each matrix's gradient at ``limit`` and count how often
    it did so (the count lives in the optimizer state, so it is checkpointed)."""

    name = "clip_grad_rms"

    def __init__(self, limit: float):
        self.limit = limit

    def applies_to(self, param):
        return param.ndim >= 2  # evaluated once per parameter

    def apply(self, grad, *, state, **context):
        rms = grad.pow(2).mean().sqrt()
        factor = torch.clamp(self.limit / rms.clamp_min(1e-30), max=1.0)  # 0-dim tensor: no host sync
        clipped = state.get("clip_count", torch.zeros((), device=grad.device))
        state["clip_count"] = clipped + (factor < 1.0).float()
        return grad.mul_(factor)


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors: more CPU threads only add overhead

    # 1. seed 004's factory (named parameters let ALLoRA find the LoRA pairs by name)
    model = LoConAndLoRA()
    opt = create_lora_optimizer(model.named_parameters(), lr=1e-3, warmup_steps=20)
    print("create_lora_optimizer: lr", opt.config.lr, "| full_finetune", opt.config.full_finetune,
          "| lora_rank_penalty", opt.config.lora_rank_penalty)

    # 2. where each built-in regulariser runs
    for name, p in model.named_parameters():
        regs = [s.name for s in opt.regularizers_for(p)]
        print(f"  {name:<24}{str(tuple(p.shape)):<18}{', '.join(regs) or '(none)'}")

    # 3. phases: W = 20 -> warmup_early t <= 10, warmup_late t <= 20, stable t <= 40, mature after
    data = batches(1)
    img0, y0 = next(batches(1))
    with torch.no_grad():
        first = float(nn.functional.mse_loss(model(img0), y0))
    print(f"{'step':>5}  {'phase':<13}{'reg. scale':>11}{'loss':>10}")
    for upto in (1, 10, 15, 20, 40, 60):
        done = opt.get_optimization_info()["training_stats"]["global_step"]
        loss = train(model, opt, data, upto - done)
        print(f"{upto:>5}  {opt.get_phase():<13}{opt.regularization_scale(upto):>11.3f}{loss:>10.5f}")
    info = opt.get_optimization_info()
    print("regularisers applied to tensors:", info["regularizers"]["applied_to_tensors"])
    print("low-rank tensors:", info["regularizers"]["low_rank_tensors"])

    # 4. OptimizerConfig + RefactoredAutomagicCameAMP + a custom strategy
    config = OptimizerConfig(lr=1e-3, warmup_steps=20, frequency_penalty=0.08, verbose=False)
    model = LoConAndLoRA()
    opt = RefactoredAutomagicCameAMP(model.named_parameters(), config, regularizers=[ClipGradRMS(limit=5e-3)])
    train(model, opt, batches(1), 15)
    counts = {n: int(opt.state[p]["clip_count"]) for n, p in model.named_parameters() if "clip_count" in opt.state[p]}
    print("custom strategy, steps clipped per tensor:", counts)

    # 5. checkpoint: model, optimizer state (config included) and the config as a dict
    buf = io.BytesIO()
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "config": opt.config.to_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = LoConAndLoRA(seed=99)
    model2.load_state_dict(ckpt["model_state_dict"])
    opt2 = RefactoredAutomagicCameAMP(model2.named_parameters(), OptimizerConfig.from_dict(ckpt["config"]),
                                      regularizers=[ClipGradRMS(limit=5e-3)])  # strategies are code: pass them again
    opt2.load_state_dict(ckpt["optimizer_state_dict"])
    print("config restored:", opt2.config == opt.config)
    train(model, opt, batches(5), 25)  # crosses into the stable and mature phases
    train(model2, opt2, batches(5), 25)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    print(f"resume bit-identical after 25 more steps: {same}")

    if not (same and opt2.config == opt.config):
        raise SystemExit("checkpoint round trip failed")
    if not loss < first:
        raise SystemExit("the loss did not fall")
    print("automagic_refactored_example: OK")


if __name__ == "__main__":
    main()
