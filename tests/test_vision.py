import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from loravl.compressor import TokenCompressor
from loravl.config import CompressorConfig, ConfigError, LoraConfig, VisionConfig
from loravl.vision import (GeluMLP, PatchProjection, VisionEncoder, normalize_pixels,
                           num_image_tokens)

from conftest import tiny_dinov2_config


def plain_dinov2(path: str) -> nn.Module:
    """The backbone without LoRA, its patch embedding computed as the encoder computes it (a matrix product; the
    convolution's own sums differ in the last bits, tested against it below): LoRA's effect alone is compared."""
    model = AutoModel.from_pretrained(path).eval()
    patches = model.embeddings.patch_embeddings
    patches.projection = PatchProjection.from_conv(patches.projection)
    return model


def test_lora_at_init_leaves_encoder_output_unchanged(tiny_dinov2_path):
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 28, 28)
    plain = plain_dinov2(tiny_dinov2_path)
    encoder = VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28)).eval()
    with torch.no_grad():
        expected = plain(pixel_values=pixels).last_hidden_state
        got = encoder(pixels)
    assert got.shape == (2, 1 + 4, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("size", [(28, 28), (31, 44)])  # 31x44: pixels past the last whole patch are dropped
def test_patch_projection_is_the_convolution_it_replaces(tiny_dinov2_path, size):
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28))
    projection = encoder.model.base_model.model.embeddings.patch_embeddings.projection
    assert isinstance(projection, PatchProjection) and isinstance(projection, nn.Conv2d)
    pixels = torch.randn(3, 3, *size, requires_grad=True)
    out = projection(pixels)
    expected = F.conv2d(pixels, projection.weight, projection.bias, stride=14)
    assert out.shape == expected.shape == (3, 32, size[0] // 14, size[1] // 14)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # Gradients too (the projection trains in full fine-tuning and for LoRA on it).
    (grad_out,) = torch.autograd.grad(out.square().sum(), pixels)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), pixels)
    torch.testing.assert_close(grad_out, grad_expected, rtol=1e-5, atol=1e-5)
    # Checkpoints keep the convolution's names and shapes.
    plain = AutoModel.from_pretrained(tiny_dinov2_path).embeddings.patch_embeddings.projection
    assert {k: v.shape for k, v in projection.state_dict().items()} == \
        {k: v.shape for k, v in plain.state_dict().items()} == {"weight": (32, 3, 14, 14), "bias": (32,)}


def test_uint8_images_are_normalised_as_the_float_path_expects(tiny_dinov2_path):
    # The loader gives uint8 RGB; the encoder normalises it with ImageNet mean/std. A float input is taken as
    # normalised already. Both must give the encoder the same numbers.
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    normalised = (pixels.double() / 255 - mean.double()) / std.double()
    encoder = VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28)).eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), encoder(normalised.float()), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(encoder(pixels), encoder(pixels.float()), atol=1e-2)  # 0-255 is not normalised
        # The loader's batches are channels-last in memory: the same images give the same tokens.
        channels_last = pixels.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        assert not channels_last.is_contiguous() and torch.equal(channels_last, pixels)
        assert torch.equal(encoder(channels_last), encoder(pixels))
        assert normalize_pixels(channels_last, encoder.pixel_scale, encoder.pixel_offset).is_contiguous()
    assert not any("pixel_" in k for k in encoder.state_dict())  # constants, not checkpoint content


def test_gelu_mlp_keeps_the_mlp_names_and_its_fused_fc1_gelu_is_fc1_then_gelu(tiny_dinov2_path):
    encoder = VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28))
    backbone = encoder.model.base_model.model
    assert all(isinstance(layer.mlp, GeluMLP) for layer in backbone.encoder.layer)
    plain = AutoModel.from_pretrained(tiny_dinov2_path)
    names = {k for k in backbone.state_dict() if ".mlp." in k}
    assert names == {k for k in plain.state_dict() if ".mlp." in k} and names  # checkpoints unchanged
    mlp = backbone.encoder.layer[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = F.gelu(mlp.fc1(x))
        # On the CPU the fused call computes the exact GELU (cuBLASLt's epilogue, on a GPU, the tanh one), so
        # this checks the wiring: shapes, the transposed weight, the bias.
        torch.testing.assert_close(mlp.fused_fc1_gelu(x, torch.float32), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mlp(x), plain.encoder.layer[0].mlp(x), rtol=0, atol=0)  # CPU: the plain MLP
    # The gradient path is the plain MLP's (the fused call has no derivative).
    x.requires_grad_(True)
    mlp(x).sum().backward()
    assert x.grad is not None and mlp.fc1.weight.grad is None  # frozen base, as loaded


def test_step_on_lora_moves_lora_only(tiny_dinov2_path):
    encoder = VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28))
    encoder.set_lora_trainable(True)
    base_before = {n: p.detach().clone() for n, p in encoder.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in encoder.lora_parameters()}
    assert {n for n, p in encoder.named_parameters() if p.requires_grad} == set(lora_before)
    opt = torch.optim.Adam([p for _, p in encoder.lora_parameters()], lr=1e-2)
    for _ in range(2):  # B is zero at init: the first step moves B only, the second A as well
        opt.zero_grad()
        encoder(torch.randn(2, 3, 28, 28)).pow(2).mean().backward()
        opt.step()
    for n, p in encoder.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, lora_before[n]), f"{n} did not move"
        else:
            assert torch.equal(p, base_before[n]), f"base weight {n} changed"


def test_frozen_weights_stored_in_bf16_change_nothing_under_autocast(tiny_dinov2_path):
    """store_frozen_weights(bf16), what the trainer does under bf16 autocast on a GPU: the backbone's matrix
    weights become bf16 (LoRA, norms, layer scales, embeddings stay fp32) and, under that autocast, outputs and
    LoRA gradients are bit for bit what the fp32 weights give, frozen (phase 1) and training (phase 2)."""
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    encoders = [VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28)) for _ in range(2)]
    encoders[1].load_state_dict(encoders[0].state_dict())
    for encoder in encoders:
        with torch.no_grad():  # a LoRA path that adds something, so phase 2's gradients reach A and B
            for n, p in encoder.lora_parameters():
                p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
    changed = encoders[1].store_frozen_weights(torch.bfloat16)
    dtypes = {n: p.dtype for n, p in encoders[1].named_parameters()}
    assert changed == sum(d == torch.bfloat16 for d in dtypes.values()) > 0
    assert all(dtypes[n] == torch.float32 for n, _ in encoders[1].lora_parameters())
    assert all(d == torch.float32 for n, d in dtypes.items() if "norm" in n or "layer_scale" in n or "embeddings."
               in n and "projection" not in n)
    adapted = [d for n, d in dtypes.items() if n.endswith("base_layer.weight")]  # the LoRA-adapted q and v
    assert adapted and all(d == torch.bfloat16 for d in adapted)
    for trainable in (False, True):
        outs, grads = [], []
        for encoder in encoders:
            encoder.set_lora_trainable(trainable)
            torch.manual_seed(1)  # the same LoRA dropout masks in phase 2
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = encoder(pixels)
            outs.append(out)
            if trainable:
                out.float().pow(2).mean().backward()
                grads.append([p.grad.clone() for _, p in encoder.lora_parameters()])
        assert torch.equal(outs[0], outs[1])
        for a, b in zip(*grads):
            assert torch.equal(a, b)
    assert encoders[1].store_frozen_weights(torch.bfloat16) == 0  # once only


def test_phase1_builds_no_graph_through_encoder(tiny_dinov2_path):
    encoder = VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28))
    out = encoder(torch.randn(1, 3, 28, 28))
    assert not out.requires_grad and out.grad_fn is None
    encoder.set_lora_trainable(True)
    assert encoder(torch.randn(1, 3, 28, 28)).grad_fn is not None


def test_frozen_encoder_runs_without_dropout_and_trains_with_it(tiny_dinov2_path):
    # A frozen LoRA path gets no dropout noise (the encoder is a fixed function in phase 1); once LoRA trains,
    # its dropout is back.
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28,
                                         lora=LoraConfig(rank=4, alpha=8, dropout=0.5)))
    with torch.no_grad():
        for _, p in encoder.lora_parameters():
            p.normal_()  # a non-zero B, so that the LoRA path (and its dropout) shows in the output
    encoder.train()
    pixels = torch.randn(2, 3, 28, 28)
    assert not encoder.model.training
    torch.testing.assert_close(encoder(pixels), encoder(pixels), rtol=0, atol=0)
    encoder.set_lora_trainable(True)
    assert encoder.model.training
    assert not torch.equal(encoder(pixels), encoder(pixels))
    encoder.set_lora_trainable(False)
    assert not encoder.model.training


def _lora_path_calls(encoder) -> list:
    """Records each call of a LoRA A layer: the adapter path ran."""
    calls = []
    for module in encoder.model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            for lora_a in module.lora_A.values():
                lora_a.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_frozen_zero_lora_path_is_skipped_and_output_exact(tiny_dinov2_path):
    # Phase 1: B is zero and frozen, so the LoRA path adds exactly nothing; it is not computed at all.
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 28, 28)
    plain = plain_dinov2(tiny_dinov2_path)
    encoder = VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28))
    calls = _lora_path_calls(encoder)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), plain(pixel_values=pixels).last_hidden_state, rtol=0, atol=0)
    assert not calls and not encoder.adapter_path_on
    assert not any(p.requires_grad for _, p in encoder.lora_parameters())

    encoder.set_lora_trainable(True)  # phase 2: the path runs and trains, though B is still zero
    encoder(pixels).sum().backward()
    assert calls and encoder.adapter_path_on
    assert all(p.grad is not None for n, p in encoder.lora_parameters() if ".lora_B." in n)


@pytest.mark.parametrize("write", ["in_place", "load_state_dict"])
def test_frozen_nonzero_lora_is_applied(tiny_dinov2_path, write):
    # A frozen LoRA that is not zero (a trained checkpoint loaded for inference, B edited in place) must act.
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 28, 28)
    trained = VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28)).eval()
    trained.set_lora_trainable(True)
    with torch.no_grad():
        for _, p in trained.lora_parameters():
            p.normal_(std=0.5)
        expected = trained(pixels)
    trained.set_lora_trainable(False)

    encoder = VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28)).eval()
    plain_out = encoder(pixels)
    if write == "in_place":
        with torch.no_grad():
            for (_, p), (_, q) in zip(encoder.lora_parameters(), trained.lora_parameters()):
                p.copy_(q)
    else:
        encoder.load_state_dict(trained.state_dict())
    calls = _lora_path_calls(encoder)
    out = encoder(pixels)
    assert calls and encoder.adapter_path_on
    assert not torch.equal(out, plain_out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for _, p in encoder.lora_parameters())  # enabling the path kept it frozen

    with torch.no_grad():  # back to zero: the path goes off again
        for n, p in encoder.lora_parameters():
            if ".lora_B." in n:
                p.zero_()
    torch.testing.assert_close(encoder(pixels), plain_out, rtol=0, atol=0)
    assert not encoder.adapter_path_on


def test_compiled_encoder_follows_the_adapter_switch(tiny_dinov2_path):
    # torch.compile must not keep a graph traced with the LoRA path off once it is back on (phase 2, a loaded
    # LoRA): LoRA would then silently get zero gradients. Dynamo's guards are what is tested (the eager backend).
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 28, 28)
    encoder = VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28)).eval()
    encoder.model.compile(backend="eager")
    plain_out = encoder(pixels)
    assert not encoder.adapter_path_on

    encoder.set_lora_trainable(True)
    opt = torch.optim.SGD([p for _, p in encoder.lora_parameters()], lr=1.0)
    encoder(pixels).pow(2).mean().backward()
    lora_b_grads = [p.grad for n, p in encoder.lora_parameters() if ".lora_B." in n]
    assert all(g is not None and g.abs().sum() > 0 for g in lora_b_grads)
    opt.step()

    encoder.set_lora_trainable(False)  # frozen again, but B has moved: the path stays on
    assert encoder.adapter_path_on
    assert not torch.allclose(encoder(pixels), plain_out)


@pytest.mark.parametrize("image_size,total", [
    (224, 86_315_520),  # the figure in our design notes: 257 position embeddings
    (518, 87_170_304),  # facebook/dinov2-base's own config.json: 1370 position embeddings
])
def test_dinov2_base_lora_parameter_budget(tmp_path, image_size, total):
    # The real dinov2-base architecture, random weights (nothing can be downloaded here).
    Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 patch_size=14, image_size=image_size).save_pretrained(tmp_path)
    encoder = VisionEncoder(VisionConfig(pretrained=str(tmp_path), random_init=True))
    encoder.set_lora_trainable(True)
    assert encoder.model.get_nb_trainable_parameters() == (589_824, total)  # PEFT's own count
    assert (encoder.summary.trainable_params, encoder.summary.total_params) == (589_824, total)
    assert encoder.summary.counts_by_kind == {"attention": 24}
    text = encoder.summary.format()
    assert f"589,824 of {total:,}" in text and "rank=16, alpha=32" in text


@pytest.mark.parametrize("requested", [["query", "value"], ["q_proj", "v_proj"]])
def test_either_naming_adapts_the_installed_dinov2(tiny_dinov2_path, requested):
    encoder = VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28,
                                         lora=LoraConfig(target_modules=requested)))
    assert len(encoder.summary.adapted_modules) == 4  # 2 layers x (query, value)
    assert encoder.summary.counts_by_kind == {"attention": 4}


def test_unknown_target_module_fails_with_field_and_names(tiny_dinov2_path):
    with pytest.raises(ConfigError, match=r"target_modules.*'qkv'.*layer names are"):
        VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, lora=LoraConfig(target_modules=["qkv"])))


def test_not_a_dinov2_checkpoint_fails_clearly(tmp_path):
    from transformers import GPT2Config
    GPT2Config(n_layer=1).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model.vision.pretrained.*'gpt2'"):
        VisionEncoder(VisionConfig(pretrained=str(tmp_path)))


def test_registers_variant_and_compressor_width_follow_the_encoder(tmp_path):
    cfg = Dinov2WithRegistersConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96,
                                    image_size=28, patch_size=14, num_register_tokens=4)
    Dinov2WithRegistersModel(cfg).save_pretrained(tmp_path)
    encoder = VisionEncoder(VisionConfig(pretrained=str(tmp_path), image_size=28))
    assert encoder.hidden_size == 48 and encoder.num_prefix_tokens == 5
    tokens = encoder(torch.randn(2, 3, 28, 28))
    assert tokens.shape == (2, num_image_tokens(encoder, 28), 48) == (2, 9, 48)
    compressed = TokenCompressor(encoder.hidden_size, CompressorConfig())(tokens)
    assert compressed.shape == (2, 9, 128)


def test_random_init_gets_position_embeddings_as_strong_as_the_patch_signal(tmp_path):
    # A random DINOv2 draws positions at std 0.02 (~5% of the patch signal): nothing downstream could learn
    # "left of". random_init replaces them with fixed 2-D sin-cos embeddings at the patch projection's scale.
    Dinov2Model(tiny_dinov2_config(image_size=56)).save_pretrained(tmp_path)
    encoder = VisionEncoder(VisionConfig(pretrained=str(tmp_path), random_init=True, image_size=56))
    embeddings = encoder.model.base_model.model.embeddings
    positions = embeddings.position_embeddings[0, 1:]  # 4x4 patches
    weight = embeddings.patch_embeddings.projection.weight
    patch_scale = float(weight.std() * weight[0].numel() ** 0.5)
    assert abs(float(positions.std()) - patch_scale) < 1e-3 * patch_scale
    # Neighbours are more alike than far-apart patches, along both axes.
    cos = torch.nn.functional.cosine_similarity
    assert cos(positions[0], positions[1], dim=0) > cos(positions[0], positions[3], dim=0)
    assert cos(positions[0], positions[4], dim=0) > cos(positions[0], positions[12], dim=0)
    loaded = VisionEncoder(VisionConfig(pretrained=str(tmp_path), image_size=56))  # from weights: untouched
    assert not torch.allclose(loaded.model.base_model.model.embeddings.position_embeddings[0, 1:], positions)


def test_an_unreachable_hub_fails_in_seconds_with_the_offline_ways(monkeypatch, tmp_path):
    """A hub name not in the cache, with the hub unreachable (here a closed port on this machine): the error comes
    at once, not after transformers' half minute of retries, and says how to train offline."""
    import time

    import huggingface_hub.constants

    from loravl.config import ConfigError, VisionConfig
    from loravl.vision import load_dinov2

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"'facebook/dinov2-base' is not a local folder nor in the local cache.*"
                                          r"configs/models/dinov2-base --model.vision.random_init true"):
        load_dinov2(VisionConfig(pretrained="facebook/dinov2-base"))
    assert time.perf_counter() - started < 10
