import copy

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.optimizers import create_lorafa_optimizer
from torch import nn

from loravl.config import LoraConfig, VisionConfig
from loravl.lora_fa import apply_lora_fa, build_lora_optimizer_param_groups
from loravl.vision import VisionEncoder


def test_vision_encoder_lora_fa_moves_b_only(tiny_dinov2_path):
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28,
                                         lora=LoraConfig(rank=4, alpha=8, variant="lora_fa", dropout=0.0)))
    encoder.set_lora_trainable(True)
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    lora = dict(encoder.lora_parameters())
    assert {n for n, p in encoder.named_parameters() if p.requires_grad} == {n for n in lora if ".lora_B." in n}
    # The trainer's plain LoRA group (A included) is harmless: A never gets a gradient, so AdamW skips it.
    opt = torch.optim.AdamW([p for p in lora.values()], lr=1e-2, weight_decay=0.1)
    for step in range(4):
        opt.zero_grad()
        encoder(torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
        opt.step()
    for n, p in encoder.named_parameters():
        if ".lora_B." in n:
            assert not torch.equal(p, before[n]), f"{n} did not move"
        else:
            assert torch.equal(p, before[n]), f"{n} moved"  # A and every base weight, bit for bit
    encoder.set_lora_trainable(False)
    encoder.set_lora_trainable(True)
    assert not any(p.requires_grad for n, p in encoder.lora_parameters() if ".lora_A." in n)


def test_param_groups_leave_a_out_for_lora_fa(tiny_dinov2_path):
    encoder = VisionEncoder(VisionConfig(pretrained=tiny_dinov2_path, image_size=28))
    named = encoder.lora_parameters()
    (plain,) = build_lora_optimizer_param_groups(named, lr=2e-4, weight_decay=0.0)
    (fa,) = build_lora_optimizer_param_groups(named, lr=2e-4, weight_decay=0.0, variant="lora_fa")
    assert len(plain["params"]) == len(named) == 2 * len(fa["params"])
    assert {id(p) for p in fa["params"]} == {id(p) for n, p in named if ".lora_B." in n}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def _lora(model: nn.Module, r: int = 4, alpha: int = 8) -> nn.Module:
    return get_peft_model(model, PeftLoraConfig(r=r, lora_alpha=alpha, target_modules=["0", "2"]))


def test_matches_peft_lorafa_optimizer_on_linear(monkeypatch):
    # PEFT computes the correction under bf16 autocast where bf16 exists; compare the method, not bf16 rounding.
    monkeypatch.setattr("peft.optimizers.lorafa.is_bf16_available", lambda: False)
    base = _mlp()
    reference, ours = _lora(copy.deepcopy(base)), _lora(copy.deepcopy(base))
    ours.load_state_dict(reference.state_dict())
    ref_opt = create_lorafa_optimizer(reference, r=4, lora_alpha=8, lr=1e-2)
    # HF AdamW (PEFT's base) and torch AdamW add eps at different places; take eps out of the comparison.
    ref_opt.param_groups[0]["eps"] = 1e-12
    apply_lora_fa(ours)
    our_opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2, eps=1e-12,
                                weight_decay=0.0)
    for step in range(4):
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step))
        for model, opt in ((reference, ref_opt), (ours, our_opt)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for (name, p_ref), (_, p_ours) in zip(reference.named_parameters(), ours.named_parameters()):
        if ".lora_B." in name:
            assert not torch.equal(p_ours, torch.zeros_like(p_ours))
            torch.testing.assert_close(p_ours, p_ref, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(p_ours, p_ref), name


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 2, 1)])
def test_conv_correction_projects_full_gradient_onto_a_row_space(kernel, stride, padding):
    # LoRA-FA's B gradient is the least-squares fit of the full-weight gradient g: s * g_B' @ A = g A^T (A A^T)^-1 A.
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Conv2d(6, 10, kernel, stride, padding)),
                           PeftLoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight)
    apply_lora_fa(model)
    layer.base_layer.weight.requires_grad_(True)  # only to read the full-weight gradient g
    model(torch.randn(4, 6, 9, 9)).pow(2).sum().backward()
    a = layer.lora_A["default"].weight.flatten(1)
    g = layer.base_layer.weight.grad.flatten(1)
    g_b = layer.lora_B["default"].weight.grad.flatten(1)
    assert layer.lora_A["default"].weight.grad is None
    projected = g @ a.T @ torch.linalg.inv(a @ a.T) @ a
    torch.testing.assert_close(2.0 * g_b @ a, projected, rtol=1e-4, atol=1e-4)


def test_apply_is_idempotent():
    model = _lora(_mlp())
    assert apply_lora_fa(model) == 2
    assert apply_lora_fa(model) == 0


def test_bench_tiny_smoke(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "lora_variants.py"
    spec = importlib.util.spec_from_file_location("bench_lora_variants", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = bench.main(["--tiny", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                           "--out", str(tmp_path / "lv.json")])
    finally:
        torch.set_num_threads(threads)
    lora, fa = rows
    assert fa["trainable_params"] * 2 == lora["trainable_params"] == lora["lora_params_total"]
    assert fa["optimizer_state"] * 2 == lora["optimizer_state"]
    assert fa["saved_activations"] < lora["saved_activations"]  # no full-width lora_A inputs kept
    assert json.loads((tmp_path / "lv.json").read_text())["results"] == rows
