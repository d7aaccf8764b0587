"""LoRA through PEFT, shared by every backbone (DINOv2, FastViT, the fine-tuning backbones): which layers a user's
target names mean in the model in hand, PEFT's config, and the summary of what was injected where."""
from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig as PeftLoraConfig
from torch import nn

from .config import ConfigError, LoraConfig

# transformers renamed DINOv2's projections (query/key/value/dense up to 5.17, q_proj/k_proj/v_proj/o_proj from
# 5.23); a user may write either. Each group lists the names of one projection.
MODULE_NAME_ALIASES: tuple[tuple[str, ...], ...] = (
    ("query", "q_proj"),
    ("key", "k_proj"),
    ("value", "v_proj"),
    ("dense", "o_proj", "out_proj"),
    ("fc1",),
    ("fc2",),
)
ATTENTION_NAMES = {"query", "q_proj", "key", "k_proj", "value", "v_proj", "dense", "o_proj", "out_proj", "in_proj"}
MLP_NAMES = {"fc1", "fc2", "c_fc", "c_proj"}
# nn.MultiheadAttention (CLIP's blocks) packs q, k and v into one in_proj weight; PEFT adapts it together with the
# block's out_proj, as one LoRA layer on the attention module.
PACKED_ATTENTION = ("in_proj", "out_proj")


def _adaptable_leaf_names(model: nn.Module) -> set[str]:
    inside_packed = {f"{name}.out_proj" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name not in inside_packed}


def _resolve_packed_attention(model: nn.Module, requested: list[str]) -> tuple[list[str], list[str]]:
    """(the attention modules to adapt, the names left): in_proj and out_proj of nn.MultiheadAttention."""
    packed = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    asked = [n for n in PACKED_ATTENTION if n in requested]
    if not packed or not asked:
        return [], requested
    if len(asked) == 1:
        raise ConfigError(f"lora target_modules: {asked[0]!r} of nn.MultiheadAttention: PEFT adapts in_proj and "
                          f"out_proj together, as one layer; name both")
    return packed, [n for n in requested if n not in PACKED_ATTENTION]


def resolve_target_modules(model: nn.Module, requested: list[str]) -> list[str]:
    """Map the user's module names onto the names this model (this transformers release) actually uses."""
    resolved, requested = _resolve_packed_attention(model, requested)
    available = _adaptable_leaf_names(model)
    for name in requested:
        if name in available:
            candidates = [name]
        else:
            group = next((g for g in MODULE_NAME_ALIASES if name in g), (name,))
            candidates = [alias for alias in group if alias in available]
        if not candidates:
            raise ConfigError(
                f"model.vision.lora.target_modules: {name!r} matches no Linear/Conv2d layer of "
                f"{type(model).__name__}; its layer names are: {', '.join(sorted(available))}"
            )
        for c in candidates:
            if c not in resolved:
                resolved.append(c)
    return resolved


def peft_lora_config(lora: LoraConfig, target_modules: list[str]) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        bias="none",
    )


@dataclass
class InjectionSummary:
    adapted_modules: list[str]
    counts_by_kind: dict[str, int]
    rank: int
    alpha: int
    trainable_params: int
    total_params: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def format(self, max_listed: int = 8) -> str:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts_by_kind.items()))
        listed = self.adapted_modules[:max_listed]
        more = len(self.adapted_modules) - len(listed)
        counts = ", ".join(f"{kind.capitalize() if kind != 'mlp' else 'MLP'} modules: {n}"
                           for kind, n in sorted(self.counts_by_kind.items()))
        lines = [
            f"LoRA injected into {len(self.adapted_modules)} modules ({kinds}), rank={self.rank}, alpha={self.alpha}",
            f"Total modules: {len(self.adapted_modules)}, {counts}, Rank: {self.rank}, Alpha: {self.alpha}",
            *[f"  {name}" for name in listed],
        ]
        if more > 0:
            lines.append(f"  ... and {more} more")
        lines.append(
            f"LoRA parameters: {self.trainable_params:,} of {self.total_params:,} "
            f"({self.trainable_percent:.3f}%)"
        )
        return "\n".join(lines)


def module_kind(name: str, module: nn.Module) -> str:
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, nn.Conv2d) and leaf not in MLP_NAMES:  # a conv MLP (FastViT's ConvMlp) counts as mlp
        return "conv"
    return "attention" if leaf in ATTENTION_NAMES else "mlp"


def injection_summary(model: nn.Module, lora: LoraConfig) -> InjectionSummary:
    """What LoRA was put where, and the parameter budget as PEFT counts it (LoRA weights / all weights)."""
    adapted, kinds = [], {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            if isinstance(module.base_layer, nn.MultiheadAttention):
                name = f"{name}.in_proj"  # its out_proj is listed as a layer of its own, inside it
            name = name.replace(".base_layer.out_proj", ".out_proj")
            adapted.append(name)
            kind = module_kind(name, module.base_layer)
            kinds[kind] = kinds.get(kind, 0) + 1
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    total = sum(p.numel() for p in model.parameters())
    return InjectionSummary(adapted, kinds, lora.rank, lora.alpha, lora_params, total)
