"""The vision encoder: a frozen DINOv2 from transformers with LoRA adapters from PEFT.

``VisionEncoder(cfg)`` loads the backbone (a hub name on a user's machine, a local folder anywhere), freezes every
base weight, injects LoRA into the resolved target modules and returns every token (CLS, registers, patches) of the
last layer. LoRA starts frozen too: the trainer unfreezes it at the phase switch (``set_lora_trainable``).
"""
from __future__ import annotations

import copy
import logging
import math
import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModel

from .config import ConfigError, VisionConfig
from .data.images import IMAGENET_MEAN, IMAGENET_STD
from .lora import injection_summary, peft_lora_config, resolve_target_modules

logger = logging.getLogger(__name__)

DINOV2_MODEL_TYPES = ("dinov2", "dinov2_with_registers")

def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the model hub (``HF_ENDPOINT``) accepts a connection within ``timeout_s``."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
        return True
    except OSError:
        return False


def load_dinov2(cfg: VisionConfig) -> nn.Module:
    """DINOv2 from a hub name or local folder; with ``random_init`` only its config is read."""
    try:
        hf_config = AutoConfig.from_pretrained(cfg.pretrained, local_files_only=True)
    except (OSError, ValueError):
        # Not a local folder nor cached: the hub must answer. Without a network transformers would retry for
        # half a minute before saying so; ask once, briefly, first.
        if not Path(cfg.pretrained).exists() and not hub_reachable():
            raise ConfigError(
                f"model.vision.pretrained: {cfg.pretrained!r} is not a local folder nor in the local cache, and the "
                f"model hub cannot be reached. Offline, give a folder written by save_pretrained, or train "
                f"dinov2-base's architecture with random weights: --model.vision.pretrained "
                f"configs/models/dinov2-base --model.vision.random_init true") from None
        try:
            hf_config = AutoConfig.from_pretrained(cfg.pretrained)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.vision.pretrained: cannot load {cfg.pretrained!r}: {e}") from e
    if hf_config.model_type not in DINOV2_MODEL_TYPES:
        raise ConfigError(
            f"model.vision.pretrained: {cfg.pretrained!r} is a {hf_config.model_type!r} model; "
            f"expected one of {DINOV2_MODEL_TYPES}"
        )
    # SDPA runs the attention as one kernel over all tokens: keeping CLS out of cuDNN's kernel was measured and not
    # taken (BENCHMARKS.md, prefix split).
    if cfg.random_init:
        model = AutoModel.from_config(hf_config, attn_implementation=cfg.attn_implementation)
        set_sincos_position_embeddings(model.embeddings)
    else:
        model = AutoModel.from_pretrained(cfg.pretrained, attn_implementation=cfg.attn_implementation)
    patches = model.embeddings.patch_embeddings
    patches.projection = PatchProjection.from_conv(patches.projection)
    if getattr(model.config, "hidden_act", None) == "gelu":  # not the SwiGLU variants
        for layer in model.encoder.layer:
            if hasattr(layer.mlp, "fc1"):
                layer.mlp = GeluMLP(layer.mlp.fc1, layer.mlp.fc2)
    return model


class GeluMLP(nn.Module):
    """DINOv2's MLP (fc1, exact GELU, fc2) with the same parameters and names, whose fc1 and GELU run as one
    cuBLASLt call (``torch._addmm_activation``, the GELU as the matrix product's epilogue) where that is exact
    enough and needs no gradient: a frozen encoder (phase 1, evaluation, captioning) under CUDA bf16/fp16
    autocast.

    The separate GELU kernel reads and writes the [tokens, 3072] activation, a visible share of a phase-1 step
    (bench/results/2026-12-01_h200_profile_phase1_forward_patch_matmul.txt). cuBLASLt's GELU is the tanh
    approximation: at most 4.7e-4 from the exact one (at x = -2.7), an eighth of bf16's rounding step at 1
    (2^-8; half of fp16's), and autocast rounds both fc1's output and the GELU's to that precision anyway.
    Anywhere else (fp32, the CPU, gradients, LoRA on fc1) it is the plain MLP.
    """

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if (hidden_states.is_cuda and torch.is_autocast_enabled("cuda") and not torch.is_grad_enabled()
                and type(self.fc1) is nn.Linear and self.fc1.bias is not None):
            return self.fc2(self.fused_fc1_gelu(hidden_states, torch.get_autocast_dtype("cuda")))
        return self.fc2(F.gelu(self.fc1(hidden_states)))

    def fused_fc1_gelu(self, hidden_states: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # _addmm_activation is not an autocast op: cast as autocast would
        x = hidden_states.reshape(-1, hidden_states.shape[-1]).to(dtype)
        out = torch._addmm_activation(self.fc1.bias.to(dtype), x, self.fc1.weight.to(dtype).t(), use_gelu=True)
        return out.view(*hidden_states.shape[:-1], -1)


class PatchProjection(nn.Conv2d):
    """A patch embedding (a convolution whose stride is its kernel, no padding) as one matrix product.

    The same weights (names and shapes, so checkpoints are unchanged) and the same products, summed in another
    order (equal to the convolution within float rounding). cuDNN's strided convolution spent more in NCHW/NHWC
    layout conversions than a [B*256, 588] x [588, 768] product takes
    (bench/results/2026-11-23_h100_profile_phase1_forward_run10.txt), and the patch gather fuses into the pixel
    normalisation when compiled.
    Returns ``[B, out, H/p, W/p]`` as the convolution does (a channels-last view: HF's flatten/transpose after
    it is then free). Pixels past the last whole patch are dropped, as the strided convolution drops them.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> nn.Conv2d:
        if (tuple(conv.stride) != tuple(conv.kernel_size) or any(conv.padding) or conv.groups != 1
                or any(d != 1 for d in conv.dilation) or type(conv) is not nn.Conv2d):
            return conv  # not a plain patchify: keep the convolution
        projection = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         bias=conv.bias is not None, device="meta")
        projection.weight, projection.bias = conv.weight, conv.bias  # the same Parameters, not copies
        return projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixel_values.shape
        ph, pw = self.kernel_size
        gh, gw = h // ph, w // pw
        if c != self.in_channels or gh == 0 or gw == 0:
            return super().forward(pixel_values)  # the convolution's own error for a wrong shape
        patches = (pixel_values[:, :, : gh * ph, : gw * pw].reshape(b, c, gh, ph, gw, pw)
                   .permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * ph * pw))
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(b, gh, gw, self.out_channels).permute(0, 3, 1, 2)


@torch.no_grad()
def set_sincos_position_embeddings(embeddings: nn.Module) -> None:
    """Fixed 2-D sin-cos patch position embeddings (as MAE), as strong as the patch projection's output.

    A randomly initialised DINOv2 draws its position embeddings at std 0.02, some 5% of what the patch projection
    gives a normalised image: its tokens then barely say where they are, and nothing downstream can learn
    "left of". Pretrained checkpoints are never touched.
    """
    table = embeddings.position_embeddings  # [1, 1 + grid*grid, D]
    grid, dim = math.isqrt(table.shape[1] - 1), table.shape[2]
    if grid * grid != table.shape[1] - 1 or dim % 4:
        return  # not a square grid: keep the random init
    weight = embeddings.patch_embeddings.projection.weight  # [D, C, p, p]
    scale = float(weight.std() * math.sqrt(weight[0].numel()))  # output std for unit-variance pixels
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = [f(axis.flatten()[:, None] * omega[None]) for axis in (ys, xs) for f in (torch.sin, torch.cos)]
    sincos = torch.cat(parts, dim=1)  # [grid*grid, D], per-element std ~0.71
    table[0, 1:] = (sincos * scale / sincos.std()).to(table.dtype)


def normalize_pixels(pixel_values: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [B, 3, H, W] -> float32 ``(x / 255 - mean) / std``, as one multiply-subtract on the device.

    Any memory layout in (the loader's batches are channels-last, [B, H, W, 3] in memory), channels-first out:
    the encoder sees one layout, and the layout change rides along with the normalisation's kernel."""
    return (pixel_values.float() * scale - offset).contiguous()


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """A transformers model's blocks recompute their activations in the backward (non-reentrant checkpoints,
    which replay dropout masks). transformers renamed the switch (activation_ from 5.2x); either is accepted."""
    new = hasattr(model, "activation_checkpointing_enable")
    if enabled:
        kwargs = {"use_reentrant": False}
        if new:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.activation_checkpointing_disable() if new else model.gradient_checkpointing_disable()


class VisionEncoder(nn.Module):
    """Frozen backbone + LoRA. ``forward(pixel_values)`` returns ``[B, prefix + patches, hidden]`` tokens.

    ``pixel_values``: uint8 RGB 0-255 (what the data loader gives), normalised here with the backbone's ImageNet
    mean and std, or float already normalised so.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        # Not saved: constants of the backbone, moved with the module to its device (no per-call host copy).
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("pixel_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("pixel_offset", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / std, persistent=False)
        self.lora_variant = cfg.lora.variant
        if cfg.backbone == "dinov2":
            backbone = load_dinov2(cfg)
            self.hidden_size = backbone.config.hidden_size
            self.num_prefix_tokens = 1 + getattr(backbone.config, "num_register_tokens", 0)
            backbone.requires_grad_(False)
            self.target_modules = resolve_target_modules(backbone, cfg.lora.target_modules)
            self.model = get_peft_model(backbone, peft_lora_config(cfg.lora, self.target_modules))
        elif cfg.backbone.startswith("fastvit_"):
            # Imported here: timm is needed only for this backbone, and fastvit.py imports this module.
            from .fastvit import build_fastvit_encoder

            # LoRA on every dense conv of cfg.lora.stages; cfg.lora.target_modules does not apply.
            self.model = build_fastvit_encoder(cfg)
            tokens = self.model.base_model.model
            self.hidden_size, self.num_prefix_tokens = tokens.hidden_size, tokens.num_prefix_tokens
            self.target_modules = [n for n, m in self.model.named_modules() if hasattr(m, "lora_A")]
        else:
            raise ConfigError(f"model.vision.backbone: unknown backbone {cfg.backbone!r} (known: dinov2, fastvit_*)")
        self.summary = injection_summary(self.model, cfg.lora)
        if self.lora_variant == "lora_fa":
            from .lora_fa import apply_lora_fa

            apply_lora_fa(self.model)
        self._lora_b = [p for n, p in self.lora_parameters() if ".lora_B." in n]
        self.adapter_path_on = True  # PEFT's LoRA layers compute their path (see update_adapter_path)
        self._zero_checked: tuple | None = None  # which lora_B tensors were last found all zero
        self.set_lora_trainable(False)

    @torch.no_grad()
    def store_frozen_weights(self, dtype: torch.dtype) -> int:
        """Keep the frozen backbone's matrix weights (every Linear but LoRA's, and the patch projection, with their
        biases) in ``dtype``, the run's autocast dtype; returns how many tensors changed.

        Autocast casts each of them to that dtype in every forward anyway, so the results are bit for bit the same
        (tests/test_vision.py), and no step reads 4 bytes and writes 2 for each of the backbone's 86M weights
        again. The backbone is then meant to run under that autocast. Its
        weights are never saved (they come from ``from_pretrained``), so checkpoints are unchanged; LoRA, norms,
        layer scales and embeddings stay fp32.
        """
        changed = 0
        for name, module in self.model.named_modules():
            if "lora_" in name or not isinstance(module, (nn.Linear, PatchProjection)):
                continue
            for param in (module.weight, module.bias):
                if param is not None and not param.requires_grad and param.dtype != dtype:
                    param.data = param.data.to(dtype)
                    changed += 1
        return changed

    def lora_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if "lora_" in n]

    def set_lora_trainable(self, trainable: bool) -> None:
        self.lora_trainable = trainable
        self.update_adapter_path()
        self._set_lora_requires_grad()
        self.train(self.training)

    def _set_lora_requires_grad(self) -> None:
        for n, p in self.lora_parameters():
            # LoRA-FA: A stays frozen at its random init for good; only B ever trains.
            p.requires_grad_(self.lora_trainable and not (self.lora_variant == "lora_fa" and ".lora_A." in n))

    def update_adapter_path(self) -> None:
        """Switch PEFT's LoRA path off while it adds exactly nothing: LoRA frozen and every B zero.

        That is phase 1 (B starts at zero and does not train until the switch). The path would still cost two
        thin matmuls and a full-width add in every adapted layer of every forward (as much memory traffic as a
        LayerNorm each). B is re-checked whenever a B tensor was written since the last check (a loaded
        checkpoint, an in-place edit): its version counter moved. That costs a device sync only then.
        """
        on = self.lora_trainable
        if not on:
            key = tuple((p.data_ptr(), p._version) for p in self._lora_b)
            if key != self._zero_checked:
                self._b_is_zero = not any(bool(p.detach().any()) for p in self._lora_b)
                self._zero_checked = key
            on = not self._b_is_zero
        if on != self.adapter_path_on:
            tuner = self.model.base_model
            tuner.enable_adapter_layers() if on else tuner.disable_adapter_layers()
            self.adapter_path_on = on
            self._set_lora_requires_grad()  # PEFT marks an adapter trainable when it enables it; the phase decides

    def train(self, mode: bool = True) -> "VisionEncoder":
        # While LoRA is frozen the encoder is a fixed function: eval mode, so no dropout noise on the frozen LoRA
        # path (it only cost random numbers for every token of every adapted layer, every step).
        super().train(mode)
        if not self.lora_trainable:
            self.model.eval()
        return self

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward instead of keeping them. Only phase 2 keeps any:
        phase 1 builds no graph through the encoder. Dropout masks are replayed, so the gradients are the same."""
        backbone = self.model.base_model.model
        if hasattr(backbone, "fastvit"):
            backbone.fastvit.set_grad_checkpointing(enabled)
        else:
            set_activation_checkpointing(backbone, enabled)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # host-side bookkeeping; a compiled caller runs it before tracing
            self.update_adapter_path()
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize_pixels(pixel_values, self.pixel_scale, self.pixel_offset)
        # Phase 1: nothing in the encoder trains, so no autograd graph is built through it at all.
        with torch.set_grad_enabled(self.lora_trainable and torch.is_grad_enabled()):
            return self.model(pixel_values=pixel_values).last_hidden_state


def num_image_tokens(encoder: VisionEncoder, image_size: int) -> int:
    """Tokens per image at ``image_size``: prefix (CLS, registers) plus patches."""
    backbone = encoder.model.base_model.model
    if hasattr(backbone, "num_tokens"):  # FastVitTokens: pooled token plus last feature map cells
        return backbone.num_tokens(image_size)
    patch = backbone.config.patch_size
    return encoder.num_prefix_tokens + (image_size // patch) ** 2


def momentum_encoder(encoder: VisionEncoder) -> VisionEncoder:
    """A copy of ``encoder`` for the momentum model: its own LoRA weights (the EMA moves them), every other
    parameter and buffer the online encoder's own tensor, so the frozen backbone is held once."""
    copied = copy.deepcopy(encoder)
    online_modules = dict(encoder.named_modules())
    for name, module in copied.named_modules():
        source = online_modules[name]
        for key in list(module._parameters):
            if "lora_" not in f"{name}.{key}" and module._parameters[key] is not None:
                module._parameters[key] = source._parameters[key]
        for key in list(module._buffers):
            if module._buffers[key] is not None:
                module._buffers[key] = source._buffers[key]
    copied.set_lora_trainable(False)
    return copied
