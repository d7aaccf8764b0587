"""Which fused SDPA kernels accept the captioner's decoding cross-attention (one query token over 257 image tokens,
batch 256, 8 heads of 64, bf16, no mask), eagerly: PyTorch's own checks (debug reasons as warnings) and a call
under each backend alone. A few seconds on a GPU:

    python3 bench/sdpa_decode_check.py
"""
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.backends.cuda import (SDPAParams, can_use_cudnn_attention, can_use_efficient_attention,
                                 can_use_flash_attention)
warnings.simplefilter("always")
q = torch.randn(256, 1, 8, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
k = torch.randn(256, 8, 257, 64, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
for name, qq in (("q transposed view", q), ("q contiguous", q.contiguous())):
    p = SDPAParams(qq, k, v, None, 0.0, False, False)
    print(name, qq.stride(), "flash", can_use_flash_attention(p, True),
          "efficient", can_use_efficient_attention(p, True),
          "cudnn", can_use_cudnn_attention(p, True))
    for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([b]):
                F.scaled_dot_product_attention(qq, k, v)
            print("  eager ok:", b)
        except Exception as e:
            print("  eager fails:", b, str(e)[-200:])
