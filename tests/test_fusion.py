import torch

from loravl.config import FusionConfig
from loravl.fusion import FusionEncoder


def _inputs():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 5, 16, generator=g)
    text = torch.randn(2, 6, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    return image, text, mask


def test_gates_at_zero_leave_unimodal_features_untouched():
    fusion = FusionEncoder(16, 32, FusionConfig(num_layers=2, num_heads=2))
    image, text, mask = _inputs()
    out = fusion(image, text, mask)
    assert torch.equal(out["text_states"], text) and torch.equal(out["image_tokens"], image)
    gates = [n for n, p in fusion.named_parameters() if n.endswith("_gate")]
    assert gates and all(float(p) == 0.0 for n, p in fusion.named_parameters() if n in gates)


def test_open_gates_mix_the_modalities_and_respect_text_padding():
    fusion = FusionEncoder(16, 32, FusionConfig(num_layers=2, num_heads=2))
    with torch.no_grad():
        for n, p in fusion.named_parameters():
            if n.endswith("_gate"):
                p.fill_(1.0)
    image, text, mask = _inputs()
    out = fusion(image, text, mask)
    assert not torch.allclose(out["text_states"], text)
    other_image = torch.randn_like(image)
    assert not torch.allclose(fusion(other_image, text, mask)["text_states"], out["text_states"])
    # Changing padded text positions must not change what the image stream (and so real text tokens) sees.
    text2 = text.clone()
    text2[0, 4:] = 100.0
    out2 = fusion(image, text2, mask)
    torch.testing.assert_close(out2["text_states"][0, :4], out["text_states"][0, :4])


def test_gradients_reach_the_gates_at_init():
    fusion = FusionEncoder(16, 32, FusionConfig(num_layers=2, num_heads=2))
    image, text, mask = _inputs()
    fusion(image, text, mask)["text_states"].pow(2).sum().backward()
    # The text stream's gates learn from the first step; the image stream's reach the loss only through them.
    gate_grads = {n: p.grad for n, p in fusion.named_parameters() if "text_from_image" in n and n.endswith("_gate")}
    assert len(gate_grads) == 4
    assert all(g is not None and g.abs().item() > 0 for g in gate_grads.values())
