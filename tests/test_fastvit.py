import copy
import dataclasses

import pytest
import timm
import torch
from peft.tuners.lora import Conv2d as PeftLoraConv2d
from torch import nn

from loravl.config import ConfigError, LoraConfig, VisionConfig, config_from_dict
from loravl.fastvit import (FastVitTokens, apply_lora_to_fastvit, dense_conv_names, merge_and_reparameterize)
from loravl.model import VisionLanguageModel
from loravl.vision import VisionEncoder, num_image_tokens

from conftest import tiny_batch


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def fastvit_t8() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("fastvit_t8", pretrained=False).eval()


def lora_layers(model: nn.Module) -> dict[str, PeftLoraConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PeftLoraConv2d)}


def test_fastvit_t8_parameter_budget(fastvit_t8, capsys):
    peft_model = apply_lora_to_fastvit(copy.deepcopy(fastvit_t8), r=16, alpha=16, stages=(0, 1, 2, 3))
    # 4,026,232 frozen timm weights (1000-class head included) + 254,976 LoRA weights.
    assert peft_model.get_nb_trainable_parameters() == (254_976, 4_281_208)
    layers = lora_layers(peft_model)
    mlp = [n for n in layers if n.endswith((".mlp.fc1", ".mlp.fc2"))]
    branch = [n for n in layers if n.endswith(".downsample.proj.1.conv_kxk.0.conv")]
    assert (len(layers), len(mlp), len(branch)) == (23, 20, 3)
    assert sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n and ".mlp." in n) == 233_472
    # Only LoRA trains; every base weight (the dense convs themselves too) is frozen.
    assert all(("lora_" in n) == p.requires_grad for n, p in peft_model.named_parameters())
    out = capsys.readouterr().out
    assert "LoRA injected into 23 modules (conv: 3, mlp: 20), rank=16, alpha=16" in out
    assert "254,976 of 4,281,208 (5.956%)" in out


def test_only_dense_convs_in_chosen_stages(fastvit_t8):
    names = dense_conv_names(fastvit_t8, stages=(1,))
    assert names and all(n.startswith("stages.1.") for n in names)
    assert all(fastvit_t8.get_submodule(n).groups == 1 for n in names)
    # Depthwise convs (RepMixer, ConvMlp 7x7, large-kernel downsampler) are never picked.
    depthwise = [n for n, m in fastvit_t8.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert not set(depthwise) & set(dense_conv_names(fastvit_t8, include_stem=True))
    with pytest.raises(ValueError, match="do not exist"):
        dense_conv_names(fastvit_t8, stages=(4,))


def test_conv_lora_shapes_and_zero_change_at_init(fastvit_t8):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = fastvit_t8(x)
    # The stem adds dense 3x3 stride-2 convs: the kernel/stride/padding case the 1x1 stage convs cannot show.
    peft_model = apply_lora_to_fastvit(copy.deepcopy(fastvit_t8), r=4, alpha=8, include_stem=True).eval()
    layers = lora_layers(peft_model)
    assert any(m.base_layer.kernel_size == (3, 3) and m.base_layer.stride == (2, 2) for m in layers.values())
    for name, layer in layers.items():
        base, a, b = layer.base_layer, layer.lora_A["default"], layer.lora_B["default"]
        assert (a.in_channels, a.out_channels) == (base.in_channels, 4), name
        assert (a.kernel_size, a.stride, a.padding) == (base.kernel_size, base.stride, base.padding), name
        assert (b.in_channels, b.out_channels, b.kernel_size, b.stride) == (4, base.out_channels, (1, 1), (1, 1))
        assert torch.count_nonzero(b.weight) == 0 and torch.count_nonzero(a.weight) > 0
        assert layer.scaling["default"] == 2.0
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), expected, rtol=0, atol=0)


def _train_a_little(peft_model: nn.Module, steps: int = 2) -> None:
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        opt.zero_grad()
        peft_model(torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(step))).logsumexp(-1).mean().backward()
        opt.step()


def test_merge_then_reparameterize_matches_unmerged(fastvit_t8):
    peft_model = apply_lora_to_fastvit(copy.deepcopy(fastvit_t8), r=8, alpha=16, include_stem=True)
    _train_a_little(peft_model)
    peft_model.eval()  # reparameterisation folds BatchNorm running statistics: eval-mode equivalence
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = peft_model.forward_features(x)
        lora_effect = (expected - fastvit_t8.forward_features(x)).abs().max()
    assert lora_effect > 1e-2 * expected.abs().max()  # training moved the function visibly

    wrong_order = timm.utils.reparameterize_model(copy.deepcopy(peft_model), inplace=True)
    fused = merge_and_reparameterize(peft_model)
    assert not lora_layers(fused)
    assert not any(hasattr(m, "conv_kxk") for m in fused.modules())  # the branches are gone
    with torch.no_grad():
        torch.testing.assert_close(fused.forward_features(x), expected, rtol=1e-4, atol=1e-4 * lora_effect)
        # Reparameterising first reads the base weights of the wrapped branch convs (stem, downsamplers) and drops
        # their LoRA update: it fails the tolerance the right order meets.
        assert not torch.allclose(wrong_order.forward_features(x), expected, rtol=1e-4, atol=1e-4 * lora_effect)


def fastvit_vision_config(**lora) -> VisionConfig:
    return VisionConfig(backbone="fastvit_t8", random_init=True, image_size=28, lora=LoraConfig(rank=4, alpha=8, **lora))


def test_vision_encoder_fastvit_tokens_and_frozen_batchnorm():
    encoder = VisionEncoder(fastvit_vision_config(stages=[2, 3]))
    assert (encoder.hidden_size, encoder.num_prefix_tokens) == (768, 1)
    assert (num_image_tokens(encoder, 224), num_image_tokens(encoder, 28), num_image_tokens(encoder, 70)) == (50, 2, 10)
    assert all(".stages.2." in n or ".stages.3." in n for n in encoder.target_modules)
    encoder.set_lora_trainable(True)
    encoder.train()
    assert not any(m.training for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))
    stats = {n: b.clone() for n, b in encoder.named_buffers() if "running" in n}
    tokens = encoder(torch.randn(2, 3, 70, 70))
    assert tokens.shape == (2, 10, 768)
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(dim=1))  # pooled token first, in the CLS role
    assert all(torch.equal(b, stats[n]) for n, b in encoder.named_buffers() if "running" in n)


def test_config_fields_for_fastvit():
    cfg = config_from_dict({"model": {"vision": {"backbone": "fastvit_t8", "lora": {"stages": [0, 3]}}}})
    assert cfg.model.vision.lora.stages == [0, 3]
    with pytest.raises(ConfigError, match="model.vision.lora.stages"):
        config_from_dict({"model": {"vision": {"lora": {"stages": [4]}}}})
    with pytest.raises(ConfigError, match="model.vision.backbone"):
        config_from_dict({"model": {"vision": {"backbone": "resnet50"}}})


def test_vlm_training_step_with_fastvit_backbone(tiny_model_config, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_model_config, vision=fastvit_vision_config())
    model = VisionLanguageModel(cfg, tiny_tokenizer)
    assert model.compressor.net[0].in_features == 768  # the compressor follows the backbone's width
    model.set_lora_trainable(True)
    model.train()
    lora_before = {n: p.detach().clone() for n, p in model.lora_parameters()}
    frozen_before = {n: p.detach().clone() for n, p in model.vision.named_parameters() if "lora_" not in n}
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-3)
    for seed in range(2):  # B is zero at init: step 1 moves B, step 2 A as well
        batch = tiny_batch(tiny_tokenizer, seed=seed)
        out = model(**batch)
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert all(not torch.equal(p, lora_before[n]) for n, p in model.lora_parameters())
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.vision.named_parameters() if "lora_" not in n)


def test_fastvit_tokens_module_is_plain_timm_inside(fastvit_t8):
    tokens = FastVitTokens(copy.deepcopy(fastvit_t8)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pooled = tokens(x).last_hidden_state[:, 0]
        torch.testing.assert_close(pooled, fastvit_t8.forward_head(fastvit_t8.forward_features(x), pre_logits=True))
