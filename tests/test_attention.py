import pytest
import torch
import torch.nn.functional as F

from loravl.attention import merge_prefix_keys


def projected_heads(b, length, h, d, dtype=torch.float32, seed=0):
    """Query, key and value as transformers hands them to attention: [B, H, L, D] views of [B, L, H, D]
    projections."""
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(b, length, h, d, generator=g)).to(dtype).transpose(1, 2) for _ in range(3)]


def attention_with_lse(query, key, value, scale):
    """The reference for the fused kernel's two outputs: softmax attention and each query's log-sum-exp."""
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    return (scores.softmax(-1) @ value.float()).to(query.dtype), scores.logsumexp(-1, keepdim=True)


@pytest.mark.parametrize("num_prefix", [1, 5])  # CLS; CLS and four registers
def test_merging_the_prefix_keys_gives_attention_over_all_keys(num_prefix):
    query, key, value = projected_heads(2, num_prefix + 16, 3, 8)
    scale = 8 ** -0.5
    patch_out, patch_lse = attention_with_lse(query, key[:, :, num_prefix:], value[:, :, num_prefix:], scale)
    merged = merge_prefix_keys(query, key, value, scale, num_prefix, patch_out, patch_lse)
    expected = F.scaled_dot_product_attention(query, key, value, scale=scale)
    assert merged.shape == expected.shape == (2, 3, num_prefix + 16, 8)
    torch.testing.assert_close(merged, expected, atol=2e-6, rtol=1e-5)
    # [B, L, H, D] in memory, what transformers' attention returns after its transpose: that copy is then free
    assert merged.transpose(1, 2).is_contiguous()


def test_merge_in_bf16_is_within_twice_one_kernels_rounding():
    query, key, value = projected_heads(2, 1 + 64, 4, 16, dtype=torch.bfloat16)
    scale = 16 ** -0.5
    patch_out, patch_lse = attention_with_lse(query, key[:, :, 1:], value[:, :, 1:], scale)
    merged = merge_prefix_keys(query, key, value, scale, 1, patch_out, patch_lse)
    exact = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), scale=scale)
    one_kernel = F.scaled_dot_product_attention(query, key, value, scale=scale)
    assert merged.dtype == torch.bfloat16
    # the patch part is rounded to bf16, then the merge: two roundings where one kernel rounds once
    merge_error = (merged.float() - exact).abs().max()
    assert merge_error <= 2 * (one_kernel.float() - exact).abs().max()
    assert merge_error <= 2 * 2 ** -8 * exact.abs().max()


def test_a_prefix_key_that_dominates_takes_over_the_output():
    # A CLS key far more similar to every query than any patch key: the merge must hand its weight to CLS's value
    query, key, value = projected_heads(1, 1 + 8, 2, 4)
    key[:, :, 0] = query.mean(2) * 50
    patch_out, patch_lse = attention_with_lse(query, key[:, :, 1:], value[:, :, 1:], 0.5)
    merged = merge_prefix_keys(query, key, value, 0.5, 1, patch_out, patch_lse)
    expected = F.scaled_dot_product_attention(query, key, value, scale=0.5)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged, patch_out, atol=1e-2)
