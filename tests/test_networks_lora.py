import hashlib
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
from networks import lora

N_TE, N_UNET = 12, 84  # 2 CLIP layers x 6; 7 Transformer2DModel blocks x 12


def _net(models, dim=4, alpha=1.0, **kwargs):
    return lora.create_network(1.0, dim, alpha, models.vae, models.text_encoder, models.unet, **kwargs)


def _train(models, network, steps=3, lr=0.5, seed=0):
    network.apply_to(models.text_encoder, models.unet, True, True)
    models.unet.requires_grad_(False)
    models.text_encoder.requires_grad_(False)
    groups, _ = network.prepare_optimizer_params(lr, lr, lr)
    opt = torch.optim.SGD(groups, lr=lr)
    latents, t = fixed_inputs(2, seed)
    target = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 1))
    network.train()
    for _ in range(steps):
        pred = models.unet(latents, t, encoder_hidden_states=encode_text(models)).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    network.eval()
    return loss.item()


def test_module_names_and_counts(tiny_models):
    net = _net(tiny_models)
    assert len(net.text_encoder_loras) == N_TE and len(net.unet_loras) == N_UNET
    names = {l.lora_name for l in net.loras}
    for expected in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_unet_up_blocks_1_attentions_1_proj_in",
        "lora_unet_up_blocks_1_attentions_1_proj_out",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_1_self_attn_out_proj",
        "lora_te_text_model_encoder_layers_1_mlp_fc1",
        "lora_te_text_model_encoder_layers_1_mlp_fc2",
    ):
        assert expected in names, expected
    assert not any("resnets" in n or "conv_in" in n for n in names)
    params = dict(net.named_parameters())
    assert len(params) == 2 * (N_TE + N_UNET)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert params[f"{key}.lora_down.weight"].shape == (4, 32)
    assert params[f"{key}.lora_up.weight"].shape == (32, 4)
    conv = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert params[f"{conv}.lora_down.weight"].shape == (4, 32, 1, 1)
    assert params[f"{conv}.lora_up.weight"].shape == (32, 4, 1, 1)
    sd = net.state_dict()
    assert len(sd) == 3 * (N_TE + N_UNET) and float(sd[f"{key}.alpha"]) == 1.0
    # original model weights are not part of the network
    assert not any("unet" in n and "lora" not in n for n in params)


def test_initialisation(tiny_models):
    torch.manual_seed(0)
    net = _net(tiny_models, dim=8, alpha=4)
    for l in net.loras:
        assert torch.count_nonzero(l.lora_up.weight) == 0
        assert torch.count_nonzero(l.lora_down.weight) > 0
        assert l.scale == pytest.approx(0.5) and float(l.alpha) == 4.0
        fan_in = l.lora_down.weight[0].numel()
        assert l.lora_down.weight.abs().max() <= 1 / fan_in**0.5 + 1e-6  # kaiming_uniform(a=sqrt(5))
    net2 = _net(tiny_models, dim=8, alpha=0)
    assert net2.unet_loras[0].scale == 1.0  # alpha 0 -> alpha = rank
    net3 = _net(tiny_models, dim=8, alpha=None)
    assert net3.unet_loras[0].scale == 1.0 / 8  # kohya's default alpha is 1


def test_zero_change_at_init_then_training_changes_output(tiny_models):
    with torch.no_grad():
        base = unet_output(tiny_models)
    net = _net(tiny_models)
    net.apply_to(tiny_models.text_encoder, tiny_models.unet, True, True)
    with torch.no_grad():
        assert torch.equal(unet_output(tiny_models), base)
    frozen = {k: v.clone() for k, v in tiny_models.unet.state_dict().items()}
    _train(tiny_models, net)
    with torch.no_grad():
        after = unet_output(tiny_models)
        assert (after - base).abs().max() > 1e-4
        for k, v in tiny_models.unet.state_dict().items():  # only the adapters moved
            assert torch.equal(v, frozen[k]), k
        assert all(torch.count_nonzero(l.lora_up.weight) > 0 for l in net.unet_loras)
        net.set_multiplier(0.0)
        assert torch.equal(unet_output(tiny_models), base)
        net.set_multiplier(1.0)
        assert torch.equal(unet_output(tiny_models), after)


def test_text_encoder_lora_changes_embeddings(tiny_models):
    with torch.no_grad():
        base = encode_text(tiny_models)
    net = _net(tiny_models)
    _train(tiny_models, net)
    with torch.no_grad():
        assert (encode_text(tiny_models) - base).abs().max() > 1e-5


def _data_region(path):
    with open(path, "rb") as f:
        blob = f.read()
    n = int.from_bytes(blob[:8], "little")
    return blob[8 + n:]


def test_save_load_round_trip_safetensors(tiny_models, tiny_sd_path, tmp_path):
    net = _net(tiny_models, dim=4, alpha=2.0)
    _train(tiny_models, net)
    with torch.no_grad():
        trained_out = unet_output(tiny_models)
    file = str(tmp_path / "out" / "lora.safetensors")
    net.save_weights(file, torch.float32, {"ss_network_dim": 4, "ss_note": "x"})
    assert sorted(os.listdir(tmp_path / "out")) == ["lora.safetensors"]  # no temp file left

    stored = load_file(file)
    sd = net.state_dict()
    assert stored.keys() == sd.keys()
    for k in sd:
        assert torch.equal(stored[k], sd[k]), k
    with safe_open(file, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_note"] == "x"
    assert meta["sshs_model_hash"] == hashlib.sha256(_data_region(file)).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8

    fresh = load_tiny_sd(tiny_sd_path)
    net2 = _net(fresh, dim=4, alpha=2.0)
    info = net2.load_weights(file)
    assert not info.missing_keys and not info.unexpected_keys
    for k, v in net2.state_dict().items():
        assert torch.equal(v, sd[k]), k
    net2.apply_to(fresh.text_encoder, fresh.unet, True, True)
    with torch.no_grad():
        assert torch.equal(unet_output(fresh), trained_out)


def test_save_dtype_torch_format_and_overwrite(tiny_models, tmp_path):
    net = _net(tiny_models)
    _train(tiny_models, net, steps=1)
    f16 = str(tmp_path / "half.safetensors")
    net.save_weights(f16, torch.float16, None)
    stored = load_file(f16)
    assert all(v.dtype == torch.float16 for v in stored.values())
    with safe_open(f16, "pt") as f:
        assert "sshs_model_hash" in f.metadata()

    pt = str(tmp_path / "w.pt")
    net.save_weights(pt, None, {"a": "b"})
    net.save_weights(pt, None, None)  # overwrite in place
    stored = torch.load(pt, weights_only=True)
    for k, v in net.state_dict().items():
        assert torch.equal(stored[k], v)
    net2 = _net(tiny_models)
    net2.load_weights(pt)
    for k, v in net2.state_dict().items():
        assert torch.equal(v, stored[k])
    assert sorted(os.listdir(tmp_path)) == ["half.safetensors", "w.pt"]


def _check_named(network, groups):
    by_name = dict(network.named_parameters())
    seen = []
    for g in groups:
        assert len(g["named"]) == len(g["params"])
        for n, p in zip(g["named"], g["params"]):
            assert by_name[n] is p, n
        seen.extend(g["named"])
    assert len(seen) == len(set(seen))
    return seen


def test_param_groups_named_and_lrs(tiny_models):
    net = _net(tiny_models)
    net.apply_to(tiny_models.text_encoder, tiny_models.unet, True, True)
    groups, desc = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert desc == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [1e-5, 1e-4]
    seen = _check_named(net, groups)
    assert set(seen) == set(dict(net.named_parameters()))
    assert all(n.startswith("lora_te_") for n in groups[0]["named"])
    assert all(n.startswith("lora_unet_") for n in groups[1]["named"])

    groups, desc = net.prepare_optimizer_params(None, None, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3]
    groups, desc = net.prepare_optimizer_params(0, 1e-4, 1e-3)  # lr 0: text encoder not trained
    assert desc == ["unet"] and len(groups) == 1
    groups, desc = net.prepare_optimizer_params(None, None, None)
    assert desc == ["textencoder", "unet"] and all("lr" not in g for g in groups)
    torch.optim.AdamW(groups, lr=1e-3)  # usable as is ("named" is just carried along)


def test_loraplus_groups(tiny_models):
    net = _net(tiny_models, loraplus_lr_ratio="16")
    groups, desc = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert desc == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 16e-5, 1e-4, 16e-4])
    _check_named(net, groups)
    for g, d in zip(groups, desc):
        ups = ["lora_up" in n for n in g["named"]]
        assert all(ups) if d.endswith("plus") else not any(ups)
        assert len(g["params"]) == (N_TE if d.startswith("text") else N_UNET)

    net = _net(tiny_models, loraplus_unet_lr_ratio="4")
    groups, desc = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert desc == ["textencoder", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 1e-4, 4e-4])
    net = _net(tiny_models, loraplus_lr_ratio="2", loraplus_text_encoder_lr_ratio="8")
    groups, desc = net.prepare_optimizer_params(1.0, 1.0, 1.0)
    assert dict(zip(desc, [g["lr"] for g in groups])) == {
        "textencoder": 1.0, "textencoder plus": 8.0, "unet": 1.0, "unet plus": 2.0}


def test_conv_dim_adds_3x3_modules(tiny_models):
    net = _net(tiny_models, dim=4, alpha=1, conv_dim="2", conv_alpha="1")
    by = {l.lora_name: l for l in net.unet_loras}
    conv_names = [n for n, l in by.items() if l.is_conv and l.lora_down.kernel_size == (3, 3)]
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in conv_names
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in conv_names
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in conv_names
    assert "lora_unet_mid_block_resnets_1_conv2" in conv_names
    assert len(conv_names) == 2 * 8 + 1 + 1  # 8 resnets x 2 convs, one downsampler, one upsampler
    for n in conv_names:
        assert by[n].lora_dim == 2 and by[n].lora_up.kernel_size == (1, 1)
    assert by["lora_unet_down_blocks_0_downsamplers_0_conv"].lora_down.stride == (2, 2)
    # kohya's C3Lier also wraps the Linear / 1x1 conv of the resnets at the linear rank
    assert by["lora_unet_down_blocks_0_resnets_0_time_emb_proj"].lora_dim == 4
    assert by["lora_unet_down_blocks_1_resnets_0_conv_shortcut"].lora_down.kernel_size == (1, 1)
    assert len(net.unet_loras) > N_UNET
    with torch.no_grad():
        base = unet_output(tiny_models)
    _train(tiny_models, net, steps=2)
    assert all(torch.count_nonzero(by[n].lora_up.weight) > 0 for n in conv_names)
    with torch.no_grad():
        assert (unet_output(tiny_models) - base).abs().max() > 1e-4


def test_create_network_from_weights_reads_dims(tiny_models, tiny_sd_path, tmp_path):
    net = _net(tiny_models, dim=8, alpha=4, conv_dim="2", conv_alpha="0.5")
    _train(tiny_models, net, steps=1)
    file = str(tmp_path / "w.safetensors")
    net.save_weights(file, None, {})

    fresh = load_tiny_sd(tiny_sd_path)
    net2, sd = lora.create_network_from_weights(1.0, file, fresh.vae, fresh.text_encoder, fresh.unet)
    assert set(sd) == set(net.state_dict())
    dims = {l.lora_name: (l.lora_dim, float(l.alpha)) for l in net.loras}
    dims2 = {l.lora_name: (l.lora_dim, float(l.alpha)) for l in net2.loras}
    assert dims2 == dims
    assert {d for d, _ in dims.values()} == {8, 2}
    info = net2.load_state_dict(sd, strict=True)
    assert not info.missing_keys
    net2.apply_to(fresh.text_encoder, fresh.unet, True, True)
    with torch.no_grad():
        assert torch.equal(unet_output(fresh), unet_output(tiny_models))

    # weights_sd given directly, and a unet-only file
    unet_sd = {k: v for k, v in sd.items() if k.startswith("lora_unet_")}
    net3, _ = lora.create_network_from_weights(1.0, None, fresh.vae, fresh.text_encoder, fresh.unet, weights_sd=unet_sd)
    assert not net3.text_encoder_loras and len(net3.unet_loras) == len(net.unet_loras)


def test_text_encoder_list_prefixes(tiny_models, tiny_sd_path):
    other = load_tiny_sd(tiny_sd_path).text_encoder
    net = lora.create_network(1.0, 4, 1, None, [tiny_models.text_encoder, other], tiny_models.unet)
    names = [l.lora_name for l in net.text_encoder_loras]
    assert len(names) == 2 * N_TE
    assert sum(n.startswith("lora_te1_text_model_") for n in names) == N_TE
    assert sum(n.startswith("lora_te2_text_model_") for n in names) == N_TE
    groups, desc = net.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)
    assert desc == ["textencoder 1", "textencoder 2", "unet"]
    assert [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4]
    assert all(n.startswith("lora_te2_") for n in groups[1]["named"])
    groups, desc = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert desc == ["textencoder", "unet"] and len(groups[0]["params"]) == 4 * N_TE

    single = lora.create_network(1.0, 4, 1, None, [tiny_models.text_encoder], tiny_models.unet)
    assert all(l.lora_name.startswith("lora_te_text_model_") for l in single.text_encoder_loras)


def test_apply_to_unet_only_drops_text_encoder_modules(tiny_models):
    net = _net(tiny_models)
    with torch.no_grad():
        base = encode_text(tiny_models)
    net.apply_to(tiny_models.text_encoder, tiny_models.unet, apply_text_encoder=False, apply_unet=True)
    assert not net.text_encoder_loras
    assert all(n.startswith("lora_unet_") for n, _ in net.named_parameters())
    groups, desc = net.prepare_optimizer_params(1e-4, 1e-4, 1e-4)
    assert desc == ["unet"]
    for l in net.unet_loras:
        torch.nn.init.normal_(l.lora_up.weight)
    with torch.no_grad():
        assert torch.equal(encode_text(tiny_models), base)


def test_dropouts_only_in_training(tiny_models):
    net = _net(tiny_models, neuron_dropout=0.3, rank_dropout="0.3", module_dropout="0.2")
    l = net.unet_loras[0]
    assert (l.dropout, l.rank_dropout, l.module_dropout) == (0.3, 0.3, 0.2)
    net.apply_to(tiny_models.text_encoder, tiny_models.unet, True, True)
    for m in net.loras:
        torch.nn.init.normal_(m.lora_up.weight, std=0.1)
    net.eval()
    with torch.no_grad():
        a, b = unet_output(tiny_models), unet_output(tiny_models)
        assert torch.equal(a, b)
        net.train()
        torch.manual_seed(1)
        c = unet_output(tiny_models)
        d = unet_output(tiny_models)
        assert not torch.equal(c, d) and not torch.equal(a, c)


def test_max_norm_regularization(tiny_models):
    net = _net(tiny_models, dim=4, alpha=4)
    for m in net.loras:
        torch.nn.init.normal_(m.lora_up.weight)
    with torch.no_grad():
        norms = [float(m.delta_weight().norm()) for m in net.loras]
    keys, mean, mx = net.apply_max_norm_regularization(1.0, "cpu")
    assert keys == sum(n > 1.0 for n in norms) > 0
    assert mx == pytest.approx(min(1.0, max(norms)), rel=1e-5)
    with torch.no_grad():
        assert all(float(m.delta_weight().norm()) <= 1.0 + 1e-5 for m in net.loras)
    assert 0 < mean <= mx
    assert net.apply_max_norm_regularization(1.0, "cpu")[0] == 0


def test_merge_to_matches_applied_network(tiny_models, tiny_sd_path):
    net = _net(tiny_models, conv_dim="2")
    _train(tiny_models, net, steps=2)
    with torch.no_grad():
        applied = unet_output(tiny_models)
    sd = net.state_dict()
    fresh = load_tiny_sd(tiny_sd_path)
    merger = _net(fresh, conv_dim="2")
    assert merger.is_mergeable()
    merger.merge_to(fresh.text_encoder, fresh.unet, sd, torch.float32, "cpu")
    with torch.no_grad():
        merged = unet_output(fresh)
    assert torch.allclose(merged, applied, atol=1e-4, rtol=1e-4)


def test_kohya_hooks(tiny_models):
    net = _net(tiny_models)
    net.enable_gradient_checkpointing()
    net.prepare_grad_etc(tiny_models.text_encoder, tiny_models.unet)
    assert all(p.requires_grad for p in net.get_trainable_params())
    net.eval()
    net.on_epoch_start(tiny_models.text_encoder, tiny_models.unet)
    assert net.training
    net.on_step_start(tiny_models.text_encoder, tiny_models.unet)
    net.apply_to(tiny_models.text_encoder, tiny_models.unet, True, True)
    net.apply_to(tiny_models.text_encoder, tiny_models.unet, True, True)  # idempotent
    net.restore()
    for m in net.unet_loras:
        torch.nn.init.normal_(m.lora_up.weight)
    with torch.no_grad():
        a = unet_output(tiny_models)
    net.apply_to(tiny_models.text_encoder, tiny_models.unet, True, True)
    with torch.no_grad():
        assert not torch.equal(unet_output(tiny_models), a)
