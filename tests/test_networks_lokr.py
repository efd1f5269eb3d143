import logging
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest_tiny import (  # noqa: F401  (fixtures are used by name)
    encode_text,
    fixed_inputs,
    one_torch_thread,
    tiny_models,
    tiny_sd_path,
    unet_output,
)
from library.tiny_sd import load_tiny_sd
from networks import lokr
from networks.names import attach_param_names, kohya_text_encoder_view

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

N_TE = 12  # CLIP: 2 layers x (q, k, v, out, fc1, fc2)


def _net(models, dim=4, alpha=1.0, **kwargs):
    return lokr.create_network(1.0, dim, alpha, models.vae, models.text_encoder, models.unet, **kwargs)


def _apply(models, net):
    net.apply_to(models.text_encoder, models.unet, apply_text_encoder=True, apply_unet=True)
    models.unet.requires_grad_(False)
    models.text_encoder.requires_grad_(False)


def _train(models, net, steps=3, lr=0.05):
    _apply(models, net)
    groups, _ = net.prepare_optimizer_params(lr, lr, lr)
    opt = torch.optim.SGD(groups, lr=lr)
    latents, t = fixed_inputs(2)
    target = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    net.train()
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(
            models.unet(latents, t, encoder_hidden_states=encode_text(models)).sample, target
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def _check_groups(net, groups):
    """Every group named, names aligned with the tensors, every trainable tensor named once."""
    by_name = dict(net.named_parameters())
    seen = []
    for g in groups:
        assert "named" in g, "group without names"
        assert isinstance(g["params"], list) and len(g["named"]) == len(g["params"])
        for n, p in zip(g["named"], g["params"]):
            assert by_name[n] is p, n
        seen.extend(g["named"])
    assert len(seen) == len(set(seen))
    assert set(seen) == set(by_name)
    return seen


CONFIGS = [
    # (network_dim, network_args, tensor suffixes that must appear)
    (4, {}, {"lokr_w1", "lokr_w2"}),  # rank >= half the factor: full w2
    (1, {}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    (1, {"decompose_both": "True"}, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    (1, {"decompose_both": "False", "factor": "-1"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    (1, {"factor": "8"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    (2, {"factor": "8", "decompose_both": "true"}, {"lokr_w2_a", "lokr_w2_b"}),
    (2, {"algo": "loha"}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    (2, {"algo": "locon"}, {"lora_down.weight", "lora_up.weight"}),
]


@pytest.mark.parametrize("dim,args,suffixes", CONFIGS, ids=lambda v: str(v))
def test_groups_carry_names(tiny_models, dim, args, suffixes):
    net = _net(tiny_models, dim=dim, **args)
    assert isinstance(net, lokr.NamedLycorisNetworkKohya)
    algo = args.get("algo", "lokr")
    module_cls = {"lokr": "LokrModule", "loha": "LohaModule", "locon": "LoConModule"}[algo]
    assert {type(m).__name__ for m in net.loras} == {module_cls}

    # before apply_to LyCORIS has not registered its modules yet; names still come through
    groups, desc = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert desc == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [1e-5, 1e-4]
    before = [list(g["named"]) for g in groups]

    _apply(tiny_models, net)
    groups, desc = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    seen = _check_groups(net, groups)
    assert [list(g["named"]) for g in groups] == before
    found = {n.split(".", 1)[1] for n in seen}
    assert suffixes <= found, found
    assert all(n.startswith("lora_te_text_model_encoder_layers_") for n in groups[0]["named"])
    assert all(n.startswith("lora_unet_") for n in groups[1]["named"])
    assert len({n.split(".")[0] for n in groups[0]["named"]}) == N_TE
    torch.optim.AdamW(groups)


def test_decompose_both_string_false_is_false(tiny_models):
    # lycoris 4.1.3 would treat the string "False" as true; networks.lokr parses it
    on = _net(tiny_models, dim=1, decompose_both="True")
    off = _net(tiny_models, dim=1, decompose_both="False")
    assert any(hasattr(m, "lokr_w1_a") for m in on.loras)
    assert not any(hasattr(m, "lokr_w1_a") for m in off.loras)


def test_default_algo_preset_and_names(tiny_models):
    net = _net(tiny_models)
    names = {m.lora_name for m in net.loras}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    # LyCORIS' full preset also covers resnets, conv_in/out and the time embedding, once each
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in names
    assert "lora_unet_time_embedding_linear_1" in names and "lora_unet_conv_in" in names
    assert len(names) == len(net.loras)


def test_loraplus_with_locon(tiny_models):
    net = _net(tiny_models, dim=2, algo="locon", loraplus_lr_ratio="16")
    _apply(tiny_models, net)
    groups, desc = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert desc == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 16e-5, 1e-4, 16e-4])
    _check_groups(net, groups)
    for g, d in zip(groups, desc):
        assert all(("lora_up" in n) == d.endswith("plus") for n in g["named"])


@pytest.mark.parametrize(
    "args",
    [{}, {"decompose_both": "True"}, {"factor": "8"}, {"use_tucker": "True"}, {"algo": "loha"}],
    ids=str,
)
def test_training_changes_output_then_save_load(tiny_models, tiny_sd_path, tmp_path, args):
    with torch.no_grad():
        base = unet_output(tiny_models)
    net = _net(tiny_models, dim=1, **args)
    _apply(tiny_models, net)
    with torch.no_grad():
        assert torch.allclose(unet_output(tiny_models), base, atol=1e-6)  # zero update at init
    _train(tiny_models, net)
    with torch.no_grad():
        trained = unet_output(tiny_models)
        assert (trained - base).abs().max() > 1e-4

    file = str(tmp_path / "lokr.safetensors")
    net.save_weights(file, torch.float32, {"ss_network_module": "networks.lokr"})
    assert os.listdir(tmp_path) == ["lokr.safetensors"]
    with safe_open(file, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lokr" and "sshs_model_hash" in meta
    stored = load_file(file)
    assert any(k.startswith("lora_te_text_model_") for k in stored)

    if args.get("use_tucker"):
        assert any(k.endswith(".lokr_t2") for k in stored)

    # rebuilt from the file alone (module types and shapes read from the tensors; LyCORIS'
    # own factor inference fails on the 4-channel conv_in / conv_out, see networks.lokr)
    fresh = load_tiny_sd(tiny_sd_path)
    net2, sd = lokr.create_network_from_weights(1.0, file, fresh.vae, fresh.text_encoder, fresh.unet)
    assert isinstance(net2, lokr.NamedLycorisNetworkKohya)
    assert set(sd) == set(stored)
    for k, v in net2.state_dict().items():
        assert torch.equal(v, stored[k]), k
    assert {m.lora_name for m in net2.loras} == {m.lora_name for m in net.loras}
    _apply(fresh, net2)
    with torch.no_grad():
        assert torch.allclose(unet_output(fresh), trained, atol=1e-6)
    groups, _ = net2.prepare_optimizer_params(1e-4, 1e-4, 1e-4)
    _check_groups(net2, groups)

    # or: same network_args, then load_weights
    fresh2 = load_tiny_sd(tiny_sd_path)
    net3 = _net(fresh2, dim=1, **args)
    _apply(fresh2, net3)
    info = net3.load_weights(file)
    assert not info.get("missing keys") and not info.get("unexpected keys")
    with torch.no_grad():
        assert torch.allclose(unet_output(fresh2), trained, atol=1e-6)


def test_text_encoder_view():
    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=8))
    view = kohya_text_encoder_view(te)
    names = [n for n, _ in view.named_modules()]
    assert "text_model.encoder.layers.0.self_attn.q_proj" in names
    assert kohya_text_encoder_view(view) is view
    assert kohya_text_encoder_view(None) is None
    pair = kohya_text_encoder_view([te, view])
    assert isinstance(pair, list) and pair[1] is view
    lin = torch.nn.Linear(2, 2)
    assert kohya_text_encoder_view(lin) is lin


def test_attach_param_names_forms():
    a, b, c = (torch.nn.Parameter(torch.zeros(i + 1)) for i in range(3))
    named = [("a", a), ("b", b), ("c", c)]
    stray = torch.nn.Parameter(torch.zeros(1))

    groups = [{"params": {"x": a, "y": b}.values(), "lr": 1.0}, {"params": [c, stray]}, {"params": c}]
    out = attach_param_names(groups, named)
    assert out is groups
    assert groups[0]["params"] == [a, b] and groups[0]["named"] == ["a", "b"] and groups[0]["lr"] == 1.0
    assert "named" not in groups[1] and groups[1]["params"] == [c, stray]  # unknown tensor: untouched
    assert groups[2]["named"] == ["c"] and groups[2]["params"] == [c]

    groups, desc = attach_param_names(([{"params": iter([b, a])}], ["unet"]), iter(named))
    assert desc == ["unet"] and groups[0]["named"] == ["b", "a"]

    keep = {"params": [a], "named": ["custom"]}
    assert attach_param_names(keep, named)["named"] == ["custom"]
    single = attach_param_names({"params": [b]}, named)
    assert single["named"] == ["b"]
    plain = [a, b]
    assert attach_param_names(plain, named) == [a, b]

    shared = torch.nn.Linear(2, 2)
    model = torch.nn.ModuleDict({"first": shared, "second": shared})
    g = attach_param_names([{"params": list(model.parameters())}], model.named_parameters(remove_duplicate=False))
    assert g[0]["named"] == ["first.weight", "first.bias"]


def test_apply_to_twice_is_harmless(tiny_models):
    net = _net(tiny_models, dim=1)
    _apply(tiny_models, net)
    _apply(tiny_models, net)  # LyCORIS' own apply_to would recurse forever on the next forward
    with torch.no_grad():
        unet_output(tiny_models)
