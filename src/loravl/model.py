"""The stage-1 vision-language model: LoRA-adapted DINOv2, token compressor, text model, fusion and three losses.

Data path (default sizes, batch B, T = 1 + 256 tokens at 224 px, L caption tokens):
  pixel_values [B,3,224,224] -> VisionEncoder [B,T,768] -> TokenCompressor [B,T,128] = image_tokens
  input_ids [B,L] -> GPT-2 body without cross-attention [B,L,512] = text_states (unimodal)
  ITC: image_pool(image_tokens) (CLS, mean or attention) -> vision_proj, text_states[<eos>] -> text_proj,
       both [B,256], L2-normalised
  ITM: FusionEncoder(image_tokens, text_states) -> fused text state at <eos> -> itm_head [.,2]
  LM:  GPT-2 with cross-attention to image_to_text(image_tokens) [B,T,512] -> logits [B,L,V]

Single-device code: the only cross-rank steps are the gathers in loravl.distributed, identities in one process.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .compressor import TokenCompressor
from .config import ModelConfig
from .fusion import FusionEncoder
from .losses import (CaptionHash, FeatureQueue, hard_negative_weights, itc_loss, lm_loss, same_caption,
                     sample_hard_negatives)
from .memory import CaptionMemory, MemoryState
from .pooling import ImagePool
from .text import CaptionTokenizer, build_text_model, encode_text, gather_eos
from .vision import VisionEncoder, momentum_encoder, num_image_tokens, set_activation_checkpointing


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer: CaptionTokenizer):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        image_dim, text_dim, embed_dim = cfg.compressor.embed_dim, cfg.text.hidden_size, cfg.loss.embed_dim

        self.vision = VisionEncoder(cfg.vision)
        self.compressor = TokenCompressor(self.vision.hidden_size, cfg.compressor)
        self.text = build_text_model(cfg.text, len(tokenizer), tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        self.image_to_text = nn.Linear(image_dim, text_dim)  # image tokens as the captioner's cross-attention input
        self.fusion = FusionEncoder(image_dim, text_dim, cfg.fusion)
        self.image_pool = ImagePool(cfg.loss.image_pooling, image_dim, cfg.loss.image_pooling_heads)
        self.vision_proj = nn.Linear(image_dim, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.itm_head = nn.Linear(text_dim, 2)
        # Larimar's episodic memory for the captioner (loravl.memory), with model.memory.enabled.
        self.memory = CaptionMemory(cfg.memory, image_dim, text_dim) if cfg.memory.enabled else None
        self.temperature = nn.Parameter(torch.tensor(cfg.loss.temperature))
        # The distillation weight of this step: the trainer ramps it (loravl.losses.distill_alpha_at). A buffer, so
        # a compiled forward reads the new value without recompiling; not saved (the trainer sets it every step).
        self.register_buffer("distill_alpha", torch.tensor(float(cfg.loss.distill_alpha)), persistent=False)

        # Momentum (EMA) copies of the trainable embedding path. The encoder is copied only with
        # loss.momentum_encoder (its LoRA weights; the frozen base is shared); otherwise its output is shared,
        # detached.
        self.vision_m = momentum_encoder(self.vision) if cfg.loss.momentum_encoder else None
        self.compressor_m = copy.deepcopy(self.compressor)
        self.image_pool_m = copy.deepcopy(self.image_pool)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_m = copy.deepcopy(self.text.transformer)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for online, momentum in self._momentum_pairs():
            momentum.requires_grad_(False)
            momentum.eval()
        if self.vision_m is not None:
            self.vision_m.eval()

        self._decoding_caches: dict = {}  # generate(compile=True); not state: rebuilt on demand
        # Listed once for momentum_update, which runs every step (in a compiled forward, a lazy listing would be
        # one more recompilation).
        pairs = self._momentum_pairs()
        self._momentum_params = ([p for o, _ in pairs for p in o.parameters()],
                                 [p for _, m in pairs for p in m.parameters()])
        if self.vision_m is not None:  # the momentum encoder's own weights are its LoRA's
            self._momentum_params[0].extend(p for _, p in self.vision.lora_parameters())
            self._momentum_params[1].extend(p for _, p in self.vision_m.lora_parameters())
        # The momentum copies' EMA step at the start of each training forward (ALBEF). The trainer turns it off and
        # takes the step itself once per optimizer step, so that k accumulated micro-batches move them as one
        # batch does, not by momentum**k.
        self.momentum_in_forward = True
        self._image_path_compiled = False  # the encoder and compressor, by compile() or generate(compile=True)
        self._forward_compiled = False  # compile(scope="forward")

        self.caption_hash = CaptionHash(cfg.text.max_length)  # which captions of a step are word for word the same
        keep_fusion_inputs = cfg.loss.itm_negatives == "queue"
        self.queue = FeatureQueue(
            cfg.loss.queue_size, embed_dim, keep_fusion_inputs=keep_fusion_inputs,
            image_tokens_shape=(num_image_tokens(self.vision, cfg.vision.image_size), image_dim),
            text_length=cfg.text.max_length,
        )

    # -- parameters and phases ----------------------------------------------------------------------------------

    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.compressor, self.compressor_m), (self.image_pool, self.image_pool_m),
                (self.vision_proj, self.vision_proj_m),
                (self.text.transformer, self.text_m), (self.text_proj, self.text_proj_m)]

    def lora_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"vision.{n}", p) for n, p in self.vision.lora_parameters()]

    def set_lora_trainable(self, trainable: bool) -> None:
        self.vision.set_lora_trainable(trainable)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "VisionLanguageModel":
        super().train(mode)
        for _, momentum in self._momentum_pairs():
            momentum.eval()  # momentum targets without dropout noise
        if self.vision_m is not None:
            self.vision_m.eval()
        return self

    def compile(self, scope: str = "forward", **kwargs) -> None:
        """``torch.compile`` the training forward in place (parameter names, hence checkpoints, unchanged).

        ``scope``: ``forward`` compiles the whole training forward (encoders, losses, momentum update and queue)
        as one graph, so its backward is one graph too: the fewest launches and host work per step. ``modules``
        compiles each heavy submodule on its own and runs the losses and bookkeeping between them eagerly; it
        also compiles the encoder that ``generate()`` and evaluation use.
        """
        # Dynamo counts recompilations per code object, and transformers' forward wrappers are one code object for
        # every GPT-2 and DINOv2 instance: the text passes (unimodal, captioner, momentum, queue negatives) by grad
        # mode and caption width, and the encoder by phase, pass the default limit of 8, after which the rest runs
        # eager with one warning (seen on an H100).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if scope == "forward":
            self._losses = torch.compile(self._losses, **kwargs)  # an instance attribute: not in the state dict
            self._forward_compiled = True
            return
        if scope != "modules":
            raise ValueError(f"compile scope must be 'forward' or 'modules', not {scope!r}")
        self._image_path_compiled = True
        for module in (self.vision.model, self.compressor, self.compressor_m, self.text.transformer, self.text_m,
                       self.fusion, *([self.vision_m.model] if self.vision_m is not None else [])):
            module.compile(**kwargs)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Trade compute for memory: the encoder's blocks (phase 2) and the text model's recompute their activations
        in the backward. The momentum copies run without a graph and are left alone."""
        self.vision.set_gradient_checkpointing(enabled)
        set_activation_checkpointing(self.text, enabled)

    @torch.no_grad()
    def momentum_update(self) -> None:
        online, momentum = self._momentum_params
        torch._foreach_lerp_(momentum, online, 1.0 - self.cfg.loss.momentum)

    @torch.no_grad()
    def clamp_parameters(self) -> None:
        """The ITC temperature back into [min_temperature, max_temperature], after each optimizer step (ALBEF's
        ``temp.clamp_``). A clamp inside the forward would give it no gradient outside that range, so it could never
        come back; the forward itself never writes a parameter (DDP replicas would drift)."""
        self.temperature.clamp_(self.cfg.loss.min_temperature, self.cfg.loss.max_temperature)

    # -- encoders -----------------------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        encoder_tokens = self.vision(pixel_values)
        image_tokens = self.compressor(encoder_tokens)
        image_pooled = self.image_pool(image_tokens)
        image_feat = F.normalize(self.vision_proj(image_pooled), dim=-1)
        return {"encoder_tokens": encoder_tokens, "image_tokens": image_tokens, "image_pooled": image_pooled,
                "image_feat": image_feat}

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        text_states = encode_text(self.text.transformer, input_ids, attention_mask)
        text_eos = gather_eos(text_states, attention_mask)
        return {"text_states": text_states, "text_eos": text_eos,
                "text_feat": F.normalize(self.text_proj(text_eos), dim=-1)}

    def itm_logits(self, image_tokens: torch.Tensor, text_states: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        fused = self.fusion(image_tokens, text_states, attention_mask)["text_states"]
        return self.itm_head(gather_eos(fused, attention_mask))

    def caption_context(self, image_tokens: torch.Tensor, memory_tokens: Optional[torch.Tensor] = None
                        ) -> torch.Tensor:
        """What the captioner cross-attends to: the image tokens, then the memory's read token where given."""
        context = self.image_to_text(image_tokens)
        return context if memory_tokens is None else torch.cat([context, memory_tokens.to(context.dtype)], dim=1)

    def caption_logits(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       memory_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.text(input_ids=input_ids, attention_mask=attention_mask,
                         encoder_hidden_states=self.caption_context(image_tokens, memory_tokens)).logits

    # -- episodic memory at inference -----------------------------------------------------------------------------

    @torch.no_grad()
    def write_memory(self, pixel_values: torch.Tensor, captions: list[str], state: Optional[MemoryState] = None,
                     forget: bool = False) -> MemoryState:
        """Write image-caption pairs into a memory, with no gradient step: a fresh memory of these pairs, or,
        given ``state``, each pair written into it in turn (``forget``: removed from it)."""
        if self.memory is None:
            raise ValueError("this model has no memory (model.memory.enabled was false when it was trained)")
        if len(captions) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {len(captions)} captions")
        tokens = self.tokenizer(captions)
        ids = tokens["input_ids"].to(pixel_values.device)
        mask = tokens["attention_mask"].to(pixel_values.device)
        pooled = self.encode_image(pixel_values)["image_pooled"]
        caption_states = self.encode_text(ids, mask)["text_eos"]
        return self.memory.write(pooled.float(), caption_states.float(), state, sign=-1.0 if forget else 1.0)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int = 30, compile: bool = False,
                 memory: Optional[MemoryState] = None, **generate_kwargs) -> list[str]:
        """Captions through transformers' ``generate()`` (greedy, beam search or sampling by its arguments).

        ``compile``: decode with a static KV cache, which transformers' ``generate()`` compiles on a GPU (CUDA
        graphs, ``CompileConfig``'s default mode): decoding a small model is bound by kernel launches, not by the
        GPU. On a GPU the encoder and compressor are compiled too (once, in place). The first call per batch
        size compiles. Greedy and sampling only; beam search reorders the cache. ``memory``: a written memory
        (``write_memory``) each image reads from, as in training.
        """
        if compile and pixel_values.device.type == "cuda" and not self._image_path_compiled:
            # With the decoding step compiled, the eager encoder is most of a call's GPU time (bench/results/
            # 2026-11-23_h100_profile_generate_run7.txt). Like generate(), compile only on a GPU.
            self.vision.model.compile()
            self.compressor.compile()
            self._image_path_compiled = True
        image = self.encode_image(pixel_values)
        memory_tokens = None
        if memory is not None:
            if self.memory is None:
                raise ValueError("this model has no memory (model.memory.enabled was false when it was trained)")
            memory_tokens = self.memory.tokens(image["image_pooled"], memory)
        context = self.caption_context(image["image_tokens"], memory_tokens)
        bos = torch.full((pixel_values.shape[0], 1), self.tokenizer.bos_id, dtype=torch.long,
                         device=pixel_values.device)
        max_new_tokens = min(max_new_tokens, self.cfg.text.max_length - 1)
        if compile and generate_kwargs.get("num_beams", 1) == 1:
            generate_kwargs.update(self._static_decoding(bos.shape[0], 1 + max_new_tokens, context.shape[1]))
        ids = self.text.generate(input_ids=bos, attention_mask=torch.ones_like(bos), encoder_hidden_states=context,
                                 max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_id,
                                 pad_token_id=self.tokenizer.pad_id, **generate_kwargs)
        return self.tokenizer.decode(ids)

    def _static_decoding(self, batch_size: int, text_length: int, image_length: int) -> dict:
        """``generate()`` arguments for compiled decoding: static caches for self- and cross-attention, kept per
        shape and dtype and reset between calls (CUDA graphs replay on fixed cache addresses)."""
        from transformers import CompileConfig, EncoderDecoderCache, StaticCache

        device = self.image_to_text.weight.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else \
            self.image_to_text.weight.dtype
        key = (batch_size, text_length, image_length, dtype, device)
        cache = self._decoding_caches.get(key)
        if cache is None:
            config = self.text.config
            cache = EncoderDecoderCache(StaticCache(config=config, max_cache_len=text_length),
                                        StaticCache(config=config, max_cache_len=image_length))
            self._decoding_caches[key] = cache
        else:
            cache.reset()
        # generate() compiles only on a GPU; elsewhere it would warn that it cannot
        return {"past_key_values": cache, **({"compile_config": CompileConfig(fullgraph=True)}
                                             if device.type == "cuda" else {})}

    # -- training forward ---------------------------------------------------------------------------------------

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """All three losses and their weighted sum (``loss``); also updates the momentum copies and the queue."""
        self.vision.update_adapter_path()  # host-side bookkeeping, kept out of compiled code
        if self.vision_m is not None:
            self.vision_m.update_adapter_path()
        if self._forward_compiled:
            # Batches are padded to their longest caption: a caption width marked dynamic from the first batch
            # compiles the graph once, not once static and again at the second width (minutes on a GPU).
            torch._dynamo.maybe_mark_dynamic(input_ids, 1)
            torch._dynamo.maybe_mark_dynamic(attention_mask, 1)
        # Every rank's batch size, exchanged on the host before any compiled code (it would break the graph).
        sizes = D.gather_batch_sizes(pixel_values.shape[0], pixel_values.device)
        return self._losses(pixel_values, input_ids, attention_mask, image_ids, sizes)

    def _losses(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_ids: torch.Tensor, sizes: list[int]) -> dict[str, torch.Tensor]:
        w = self.cfg.loss
        image = self.encode_image(pixel_values)
        text = self.encode_text(input_ids, attention_mask)
        temperature = self.temperature

        with torch.no_grad():
            if self.training and self.momentum_in_forward:
                self.momentum_update()
            encoder_tokens_m = image["encoder_tokens"].detach()
            if self.vision_m is not None and self.vision.lora_trainable:
                # Phase 2: the EMA LoRA weights differ from the online ones. In phase 1 neither has moved, and
                # both encoders run without dropout: the online output is the momentum one.
                encoder_tokens_m = self.vision_m(pixel_values)
            image_tokens_m = self.compressor_m(encoder_tokens_m)
            image_feat_m = F.normalize(self.vision_proj_m(self.image_pool_m(image_tokens_m)), dim=-1)
            text_feat_m = F.normalize(
                self.text_proj_m(gather_eos(encode_text(self.text_m, input_ids, attention_mask), attention_mask)),
                dim=-1)
            image_feat_m_global = D.gather_no_grad(image_feat_m, sizes)
            text_feat_m_global = D.gather_no_grad(text_feat_m, sizes)
            image_ids_global = D.gather_no_grad(image_ids, sizes)
            caption_ids = self.caption_hash(input_ids, attention_mask)
            caption_ids_global = D.gather_no_grad(caption_ids, sizes)
            caption_ids_all = torch.cat([caption_ids_global, self.queue.caption_ids])
            # Every queue slot is a candidate column, masked until written: the same shapes every step.
            image_feat_all = torch.cat([image_feat_m_global, self.queue.image_feats.to(image_feat_m.dtype)])
            text_feat_all = torch.cat([text_feat_m_global, self.queue.text_feats.to(text_feat_m.dtype)])
            image_ids_all = torch.cat([image_ids_global, self.queue.image_ids])
            candidate_mask = torch.cat([torch.ones_like(image_ids_global, dtype=torch.bool), self.queue.valid_mask()])

        loss_itc = itc_loss(image["image_feat"], text["text_feat"], image_feat_all, text_feat_all,
                            image_ids, image_ids_all, temperature,
                            self.distill_alpha if w.distill_alpha > 0 else 0.0, image_feat_m, text_feat_m,
                            candidate_mask, *((caption_ids, caption_ids_all) if w.same_caption_positive else ()))

        # ITM's positives by image id, and by caption where identical captions count as positives.
        own = caption_ids if w.same_caption_positive else None
        if w.itm_negatives == "queue":
            itm = self._itm_queue_negatives(image, text, attention_mask, image_ids, own, temperature)
        else:
            itm = self._itm_batch_negatives(image, text, attention_mask, image_ids, own, caption_ids_global,
                                            temperature, sizes)

        logits = self.caption_logits(image["image_tokens"], input_ids, attention_mask)
        loss_lm = lm_loss(logits, input_ids, attention_mask, w.label_smoothing)
        text_lm = {}
        if w.text_lm_weight > 0:
            text_lm["loss_text_lm"] = lm_loss(self.text.lm_head(text["text_states"]), input_ids, attention_mask,
                                              w.label_smoothing)
        memory_losses = self._memory_losses(image, text, input_ids, attention_mask) if self.memory is not None \
            else {}

        if self.training:
            extra = {}
            if self.queue.keep_fusion_inputs:
                # The online tokens, dropout and all: ITM's queued negative images then come through the path its
                # positives take, and the noise alone cannot tell them apart (momentum tokens have none).
                extra = dict(image_tokens=D.gather_no_grad(image["image_tokens"].detach(), sizes),
                             text_ids=D.gather_no_grad(input_ids, sizes),
                             text_mask=D.gather_no_grad(attention_mask, sizes))
            self.queue.enqueue(image_feat_m_global, text_feat_m_global, image_ids_global, caption_ids_global, **extra)

        loss = w.itc_weight * loss_itc + w.itm_weight * itm["loss_itm"] + w.lm_weight * loss_lm
        if text_lm:
            loss = loss + w.text_lm_weight * text_lm["loss_text_lm"]
        if memory_losses:
            loss = loss + w.lm_weight * memory_losses["loss_memory_lm"] + \
                self.cfg.memory.kl_weight * memory_losses["loss_memory_kl"]
        return {"loss": loss, "loss_itc": loss_itc, "loss_itm": itm["loss_itm"], "loss_lm": loss_lm, **text_lm,
                **memory_losses, "itm_accuracy": itm["itm_accuracy"], "temperature": temperature.detach()}

    def _memory_losses(self, image: dict, text: dict, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Larimar's terms: the caption decoded through memory (the batch written as episodes, each image reading
        its own), and the read weights' KL. In training a share of the pairs is written with the next image's
        caption, which only the memory can give; the plain LM loss is the decode-without-memory term."""
        batch = input_ids.shape[0]
        captions = torch.arange(batch, device=input_ids.device)
        if self.training and self.cfg.memory.swap_fraction > 0:
            swapped = torch.rand(batch, device=input_ids.device) < self.cfg.memory.swap_fraction
            captions = torch.where(swapped, (captions + 1) % batch, captions)
        ids, mask = input_ids[captions], attention_mask[captions]
        caption_states = text["text_eos"][captions]
        memory_tokens, kl = self.memory.episode_tokens(image["image_pooled"], caption_states)
        logits = self.caption_logits(image["image_tokens"], ids, mask, memory_tokens)
        return {"loss_memory_lm": lm_loss(logits, ids, mask, self.cfg.loss.label_smoothing), "loss_memory_kl": kl}

    def _itm_loss(self, image_tokens: torch.Tensor, text_states: torch.Tensor, mask: torch.Tensor,
                  pair_is_valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Positives first (label 1), then negatives (label 0); pairs whose negative does not exist weigh 0."""
        logits = self.itm_logits(image_tokens, text_states, mask)
        num_positive = logits.shape[0] - pair_is_valid.shape[0]
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[:num_positive] = 1
        weight = torch.cat([torch.ones(num_positive, device=logits.device), pair_is_valid.float()])
        per_pair = F.cross_entropy(logits.float(), labels, reduction="none")
        loss = (per_pair * weight).sum() / weight.sum()
        accuracy = (((logits.argmax(dim=1) == labels).float() * weight).sum() / weight.sum()).detach()
        return {"loss_itm": loss, "itm_accuracy": accuracy}

    def _itm_batch_negatives(self, image: dict, text: dict, mask: torch.Tensor, image_ids: torch.Tensor,
                             caption_ids: Optional[torch.Tensor], caption_ids_global: torch.Tensor,
                             temperature: torch.Tensor, sizes: list[int]) -> dict[str, torch.Tensor]:
        """For each image one hard negative text, for each text one hard negative image, from the global batch."""
        image_tokens, text_states = image["image_tokens"], text["text_states"]
        image_tokens_global = D.gather_with_grad(image_tokens, sizes)
        text_states_global = D.gather_with_grad(text_states, sizes)
        with torch.no_grad():
            mask_global = D.gather_no_grad(mask, sizes)
            image_ids_global = D.gather_no_grad(image_ids, sizes)
            image_feat_global = D.gather_no_grad(image["image_feat"], sizes)
            text_feat_global = D.gather_no_grad(text["text_feat"], sizes)
            positive = image_ids[:, None] == image_ids_global[None, :]
            if caption_ids is not None:
                positive |= same_caption(caption_ids, caption_ids_global)
            weights_i2t = hard_negative_weights(image["image_feat"] @ text_feat_global.t() / temperature, positive)
            weights_t2i = hard_negative_weights(text["text_feat"] @ image_feat_global.t() / temperature, positive)
            hard_negative_texts, has_text = sample_hard_negatives(weights_i2t, positive)
            hard_negative_images, has_image = sample_hard_negatives(weights_t2i, positive)
            # Rows without a negative keep a dummy index (0) and weigh 0 in the loss: no host sync, fixed shapes.
            hard_negative_texts, hard_negative_images = (hard_negative_texts.clamp(min=0),
                                                         hard_negative_images.clamp(min=0))

        pair_images = torch.cat([image_tokens, image_tokens, image_tokens_global[hard_negative_images]])
        pair_texts = torch.cat([text_states, text_states_global[hard_negative_texts], text_states])
        pair_masks = torch.cat([mask, mask_global[hard_negative_texts], mask])
        return self._itm_loss(pair_images, pair_texts, pair_masks, torch.cat([has_text, has_image]))

    def _itm_queue_negatives(self, image: dict, text: dict, mask: torch.Tensor, image_ids: torch.Tensor,
                             caption_ids: Optional[torch.Tensor], temperature: torch.Tensor) -> dict[str, torch.Tensor]:
        """As above, but the negatives come from the queue: its image tokens, and its texts re-encoded."""
        with torch.no_grad():
            # Queue slots not yet written are never negatives; before the first enqueue no row has one, and the
            # negative pairs then weigh 0 (the same shapes from the first step on).
            not_candidate = (image_ids[:, None] == self.queue.image_ids[None, :]) | ~self.queue.valid_mask()[None, :]
            if caption_ids is not None:
                not_candidate |= same_caption(caption_ids, self.queue.caption_ids)
            text_feats = self.queue.text_feats.to(text["text_feat"].dtype)
            image_feats = self.queue.image_feats.to(image["image_feat"].dtype)
            weights_i2t = hard_negative_weights(image["image_feat"] @ text_feats.t() / temperature, not_candidate)
            weights_t2i = hard_negative_weights(text["text_feat"] @ image_feats.t() / temperature, not_candidate)
            hard_negative_texts, has_text = sample_hard_negatives(weights_i2t, not_candidate)
            hard_negative_images, has_image = sample_hard_negatives(weights_t2i, not_candidate)
            hard_negative_texts, hard_negative_images = (hard_negative_texts.clamp(min=0),
                                                         hard_negative_images.clamp(min=0))
            negative_ids = self.queue.text_ids[hard_negative_texts]
            negative_mask = self.queue.text_mask[hard_negative_texts]
            negative_image_tokens = self.queue.image_tokens[hard_negative_images].to(image["image_tokens"].dtype)
        negative_text_states = encode_text(self.text.transformer, negative_ids, negative_mask)
        # Queued captions are stored at max_length; pad this batch's texts to match.
        pad = negative_ids.shape[1] - mask.shape[1]
        text_states, mask = F.pad(text["text_states"], (0, 0, 0, pad)), F.pad(mask, (0, pad))

        pair_images = torch.cat([image["image_tokens"], image["image_tokens"], negative_image_tokens])
        pair_texts = torch.cat([text_states, negative_text_states, text_states])
        pair_masks = torch.cat([mask, negative_mask, mask])
        return self._itm_loss(pair_images, pair_texts, pair_masks, torch.cat([has_text, has_image]))

    def parameter_budget(self) -> dict[str, int]:
        """Parameter counts by component (momentum copies and buffers excluded)."""
        parts = {"vision_base": sum(p.numel() for n, p in self.vision.named_parameters() if "lora_" not in n),
                 "vision_lora": sum(p.numel() for _, p in self.vision.lora_parameters())}
        for name in ("compressor", "text", "image_to_text", "fusion", "image_pool", "vision_proj", "text_proj",
                     "itm_head", "memory"):
            module = getattr(self, name)
            parts[name] = 0 if module is None else sum(p.numel() for p in module.parameters())
        parts["momentum_copies"] = sum(p.numel() for p in self._momentum_params[1])
        return parts

    # -- checkpoint contents ------------------------------------------------------------------------------------

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen pretrained encoder weights (reloaded from ``vision.pretrained``).

        LoRA A and B are always kept, frozen or not (A is random at init). A randomly initialised encoder has no
        file to come back from, so it is kept whole.
        """
        state = self.state_dict()
        if self.cfg.vision.random_init:
            return state
        return {k: v for k, v in state.items()
                if not (k.startswith(("vision.", "vision_m.")) and "lora_" not in k)}
