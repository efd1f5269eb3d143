"""HinaAdamWOptimizer on a real LyCORIS LoKr network (lycoris-lora), built on a small torch model.

``lycoris.create_lycoris`` wraps the Linear layers of a small model with LoKr modules; their
parameters are named like ``lycoris_0.lokr_w1``, ``lycoris_0.lokr_w2_a``, ``lycoris_0.lokr_w2_b``.
HinaAdamWOptimizer reads these names (``network.named_parameters()``), groups the factors of
each module and applies its LoKr rules: the LoRA+-style ratio 0.6 * alora_ratio on the w2
side, the Kronecker-aware scale 1 / (1 + 0.3 ||w1|| ||w2||) and the gentler LoKr weight decay.

Run from the repository root (CPU, a few seconds, no downloads):

    python docs/examples/hina_adamw_lokr_example.py
"""
from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from library.custom_hina_adamw_optimizer import HinaAdamWOptimizer  # noqa: E402


def build_network(seed: int = 0):
    import copy

    from lycoris import create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # LyCORIS logs every module it creates
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64))
    model.requires_grad_(False)  # the base model stays frozen; only the LoKr factors train
    base = copy.deepcopy(model)  # an untouched copy, for the training targets
    network = create_lycoris(model, 1.0, linear_dim=8, linear_alpha=8, algo="lokr", factor=4)
    network.apply_to()
    return model, base, network


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors: more CPU threads only add overhead
    model, base, network = build_network()
    print("LoKr parameters:")
    for name, p in network.named_parameters():
        print(f"  {name:<22}{tuple(p.shape)}")

    optimizer = HinaAdamWOptimizer(
        network.named_parameters(),   # names: required for the LoKr / LoRA type rules
        lr=1e-3,
        alora_ratio=16.0,             # LoRA up gets x16; the LoKr w2 side gets 0.6 * 16 = x9.6
        wd_transition_steps=50,       # short, so the dynamic decay is visible in this demo
        wd_min_ratio=0.1,
    )
    info = optimizer.get_optimization_info()
    print("detection:", info["detection"])
    print("lokr_stats:", info["lokr_stats"])
    print("lora_stats:", info["lora_stats"])

    diag = optimizer.diagnose_lora_pairing()
    print(f"diagnose_lora_pairing: {diag['adapter_parameters']} adapter tensors in {diag['modules']} modules, "
          f"{diag['unpaired_count']} unpaired")
    for row in diag["parameters"]:
        print(f"  {row['name']:<22}type={row['type']:<10} paired_with={row['paired_with']}")

    # learn a hidden change of the model's output
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(64, 4, generator=gen) @ torch.randn(4, 64, generator=gen) * 0.05
    with torch.no_grad():
        probe = torch.randn(256, 64, generator=gen)
        base_out = model(probe)
    losses = []
    for step in range(150):
        x = torch.randn(64, 64, generator=gen)
        with torch.no_grad():
            y = base(x) + x @ delta.t()  # target: the frozen model plus a hidden low-rank change
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    print(f"loss: first {losses[0]:.5f} -> mean of last 10 {sum(losses[-10:]) / 10:.5f}")
    with torch.no_grad():
        moved = float((model(probe) - base_out).abs().max())
    print(f"max change of the model output on a probe batch: {moved:.4f}")

    w1 = dict(network.named_parameters())["lycoris_0.lokr_w1"]
    t = optimizer.state[w1]["step"]
    print(f"Kronecker scale of lycoris_0 now: {float(optimizer._kron_scale[w1]):.4f}; "
          f"LoKr decay multiplier at step {t}: {optimizer._wd_multiplier(w1, t, optimizer.param_groups[0]):.3f}")

    # the same network without names: no LoKr rule applies, and the shape fallback (meant for LoRA)
    # can only pair neighbouring low-rank factors. Always pass names for LyCORIS networks.
    plain = HinaAdamWOptimizer([p for p in network.parameters()], lr=1e-3)
    pinfo = plain.get_optimization_info()
    print("without names -> detection:", pinfo["detection"], "| lokr_groups:", pinfo["lokr_stats"]["lokr_groups"])
    for rel in plain.get_relationship_summary()["relationships"]:
        print(f"  shape-based pair: #{rel['param_index']} {rel['param_shape']} <-> "
              f"#{rel['partner_index']} {rel['partner_shape']}")

    if not (info["lokr_stats"]["lokr_groups"] == 2 and diag["unpaired_count"] == 0):
        raise SystemExit("LoKr modules were not detected")
    if not sum(losses[-10:]) / 10 < losses[0]:
        raise SystemExit("the loss did not go down")
    print("hina_adamw_lokr_example: OK")


if __name__ == "__main__":
    main()
