"""The text side: a byte-level BPE tokenizer trained offline on the captions, and a small GPT-2-style language model.

One ``GPT2LMHeadModel`` with cross-attention layers serves twice: run without image tokens it is the unimodal text
encoder (its state at [EOS] is the text embedding for ITC, as in CLIP's causal text transformer); run with the
image tokens as ``encoder_hidden_states`` it is the captioning decoder, and ``generate()`` decodes with it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AttentionInterface, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import masked_text_attention
from .config import ConfigError, TextConfig

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

# The text model's attention: transformers' SDPA, except that cross-attention to the image tokens gets no mask.
ATTENTION = "loravl_sdpa"


def sdpa_unmasked_image_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: Optional[torch.Tensor], **kwargs):
    """SDPA where cross-attention to the image tokens runs without a mask.

    Every image token is real: the model never passes an ``encoder_attention_mask``. Eagerly, transformers then
    passes no mask either. While compiling, transformers 5.17 materialises an all-ones mask 257 tokens wide. With
    that mask no fused kernel applies, and SDPA takes its fp32 math path in every captioner layer and every
    decoding step (bench/results/2026-11-23_h100_profile_generate_run5.txt). Self-attention keeps its mask: text
    has padding; on a GPU it takes the memory-efficient kernel (``loravl.attention``).
    """
    if getattr(module, "is_cross_attention", False):
        attention_mask = None
    with masked_text_attention(query, attention_mask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, sdpa_unmasked_image_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def train_tokenizer(captions: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE over the training captions, with <pad>/<bos>/<eos>; no network, a few seconds."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((c.lower().strip() for c in captions), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A local HF tokenizer folder (ours, saved with a checkpoint, or any other); adds the specials it lacks."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.text.tokenizer: cannot load a tokenizer from {str(path)!r}: {e}") from e
    if tok.bos_token is None:
        tok.add_special_tokens({"bos_token": BOS})
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": EOS})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD})
    return tok


class CaptionTokenizer:
    """captions -> ``input_ids``/``attention_mask`` as ``<bos> caption <eos> <pad>...``, cut to ``max_length``.

    A batch is padded to its longest caption rounded up to a multiple of ``pad_to_multiple_of`` (at most
    ``max_length``): short captions cost no compute on padding, and a compiled model sees only a few shapes.
    Picklable, so the data loader's workers can tokenize in the collate function.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, max_length: int, pad_to_multiple_of: int = 8):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        body = self.tokenizer([c.lower().strip() for c in captions], add_special_tokens=False)["input_ids"]
        rows = [[self.bos_id, *tokens[: self.max_length - 2], self.eos_id] for tokens in body]  # keeps <eos>
        m = self.pad_to_multiple_of
        width = min(self.max_length, -(-max((len(r) for r in rows), default=2) // m) * m)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Generated ids -> text, stopping at <eos>."""
        out = []
        for row in ids.tolist():
            if row and row[0] == self.bos_id:
                row = row[1:]
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            out.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return out

    def save(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(str(path))


def build_text_model(cfg: TextConfig, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> GPT2LMHeadModel:
    """GPT-2 with cross-attention layers; ``vocab_size`` is the tokenizer's real size (BPE may stop short of
    ``cfg.vocab_size`` on a small corpus)."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.max_length,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        add_cross_attention=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    model = GPT2LMHeadModel(config)
    model.set_attn_implementation(ATTENTION)
    return model


def eos_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (the <eos>) in a right-padded batch."""
    return attention_mask.sum(dim=1) - 1


def gather_eos(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    idx = eos_positions(attention_mask)
    return states[torch.arange(states.shape[0], device=states.device), idx]


def encode_text(transformer: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                encoder_hidden_states: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hidden states of the GPT-2 body; without image tokens the cross-attention layers are skipped."""
    return transformer(input_ids=input_ids, attention_mask=attention_mask,
                       encoder_hidden_states=encoder_hidden_states).last_hidden_state
