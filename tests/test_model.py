import dataclasses

import pytest
import torch

from loravl.model import VisionLanguageModel

from conftest import tiny_batch


def _model(cfg, tokenizer, **loss_overrides):
    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **loss_overrides))
    return VisionLanguageModel(cfg, tokenizer)


def test_forward_backward_all_losses_finite(tiny_model_config, tiny_tokenizer):
    model = _model(tiny_model_config, tiny_tokenizer)
    out = model(**tiny_batch(tiny_tokenizer, 4))
    for name in ("loss", "loss_itc", "loss_itm", "loss_lm"):
        assert torch.isfinite(out[name]), name
    w = model.cfg.loss
    expected = w.itc_weight * out["loss_itc"] + w.itm_weight * out["loss_itm"] + w.lm_weight * out["loss_lm"]
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()


def test_text_lm_loss_is_the_text_model_read_without_the_image(tiny_model_config, tiny_tokenizer):
    model = _model(tiny_model_config, tiny_tokenizer, text_lm_weight=0.5).eval()
    batch = tiny_batch(tiny_tokenizer, 4)
    out = model(**batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # The plain GPT-2 forward with no image: what a text-only scorer (and the exported causal LM) computes.
    logits = model.text(input_ids=ids, attention_mask=mask).logits
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, label_smoothing=model.cfg.loss.label_smoothing)
    assert torch.allclose(out["loss_text_lm"], expected, atol=1e-5)
    w = model.cfg.loss
    total = w.itc_weight * out["loss_itc"] + w.itm_weight * out["loss_itm"] + w.lm_weight * out["loss_lm"] \
        + 0.5 * out["loss_text_lm"]
    assert torch.allclose(out["loss"], total)
    # The term alone trains the text model's own layers, never its cross-attention to the image.
    model.zero_grad(set_to_none=True)
    out["loss_text_lm"].backward()
    grads = {n for n, p in model.text.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("attn.c_attn" in n for n in grads) and "transformer.wte.weight" in grads  # lm_head is tied to wte
    assert not any("crossattention" in n for n in grads)
    assert "loss_text_lm" not in _model(tiny_model_config, tiny_tokenizer)(**batch), "off by default"


def _params_with_grad(model):
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_reach_exactly_the_trainable_parameters(tiny_model_config, tiny_tokenizer):
    model = _model(tiny_model_config, tiny_tokenizer)
    model(**tiny_batch(tiny_tokenizer, 4))["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert _params_with_grad(model) == trainable
    assert not any(n.startswith("vision.") for n in trainable), "phase 1 trains nothing in the encoder"
    assert not any(n.split(".")[0].endswith("_m") for n in trainable), "momentum copies never train"

    model.zero_grad(set_to_none=True)
    model.set_lora_trainable(True)
    model(**tiny_batch(tiny_tokenizer, 4))["loss"].backward()
    with_grad = _params_with_grad(model)
    lora = {n for n, _ in model.lora_parameters()}
    assert lora and lora <= with_grad
    assert {n for n in with_grad if n.startswith("vision.")} == lora


def test_momentum_copies_follow_by_ema_and_queue_fills(tiny_model_config, tiny_tokenizer):
    model = _model(tiny_model_config, tiny_tokenizer, momentum=0.5)
    opt = torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=0.1)
    before_online = model.text_proj.weight.detach().clone()
    model(**tiny_batch(tiny_tokenizer, 4))["loss"].backward()
    opt.step()
    after_online = model.text_proj.weight.detach().clone()
    momentum_before = model.text_proj_m.weight.detach().clone()
    model(**tiny_batch(tiny_tokenizer, 4, seed=1))
    torch.testing.assert_close(model.text_proj_m.weight, 0.5 * momentum_before + 0.5 * after_online)
    assert not torch.equal(before_online, after_online)
    assert int(model.queue.filled) == 8


def test_attention_pooling_trains_its_probe_and_keeps_a_momentum_copy(tiny_model_config, tiny_tokenizer):
    model = _model(tiny_model_config, tiny_tokenizer, image_pooling="attention", image_pooling_heads=2, momentum=0.5)
    pool_params = {n for n, _ in model.image_pool.named_parameters()}
    assert {"probe", "attn.in_proj_weight", "norm.weight", "mlp.0.weight"} <= pool_params
    opt = torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=0.5)
    model(**tiny_batch(tiny_tokenizer, 4))["loss"].backward()
    assert model.image_pool.probe.grad is not None and model.image_pool.probe.grad.abs().sum() > 0
    assert model.image_pool_m.probe.grad is None and not model.image_pool_m.probe.requires_grad
    opt.step()
    momentum_before = model.image_pool_m.probe.detach().clone()
    model(**tiny_batch(tiny_tokenizer, 4, seed=1))
    torch.testing.assert_close(model.image_pool_m.probe, 0.5 * momentum_before + 0.5 * model.image_pool.probe)


def test_attention_pool_weights_tokens_by_content():
    from loravl.pooling import ImagePool

    torch.manual_seed(0)
    pool = ImagePool("attention", 8, num_heads=2).eval()
    tokens = torch.randn(3, 5, 8)
    out = pool(tokens)
    assert out.shape == (3, 8)
    # Unlike a mean, the pool is not linear in the tokens: doubling every token does not double the output.
    assert not torch.allclose(pool(2 * tokens), 2 * out, atol=1e-3)
    torch.testing.assert_close(ImagePool("mean", 8)(tokens), tokens.mean(dim=1))
    torch.testing.assert_close(ImagePool("cls", 8)(tokens), tokens[:, 0])
    with pytest.raises(ValueError, match="image_pooling_heads"):
        ImagePool("attention", 8, num_heads=3)


def test_eval_forward_leaves_queue_and_momentum_alone(tiny_model_config, tiny_tokenizer):
    model = _model(tiny_model_config, tiny_tokenizer).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(**tiny_batch(tiny_tokenizer, 4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("image_ids", [[5], [3, 3, 3, 3], [0, 0, 1, 1]])
def test_degenerate_batches_do_not_crash_itm(tiny_model_config, tiny_tokenizer, image_ids):
    # A batch of one, or every caption of one image: no valid hard negative exists for some rows.
    model = _model(tiny_model_config, tiny_tokenizer, queue_size=0)
    out = model(**tiny_batch(tiny_tokenizer, len(image_ids), image_ids=image_ids))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()


def test_itm_negatives_from_the_queue(tiny_model_config, tiny_tokenizer):
    model = _model(tiny_model_config, tiny_tokenizer, itm_negatives="queue")
    assert model.queue.image_tokens.shape == (32, 5, 16)
    model(**tiny_batch(tiny_tokenizer, 4, image_ids=[0, 1, 2, 3]))
    out = model(**tiny_batch(tiny_tokenizer, 4, image_ids=[4, 5, 6, 7], seed=1))
    assert torch.isfinite(out["loss_itm"])
    out["loss"].backward()
    stored = set(model.queue.image_ids[model.queue.valid_mask()].tolist())
    assert stored == set(range(8))


def test_itm_queue_negatives_carry_the_same_dropout_noise_as_positives(tiny_model_config, tiny_tokenizer):
    """Queued negative images come through the path positives take (online encoder and compressor, dropout on), so
    their dropout noise cannot tell them apart: the best threshold on each sample's distance from its noise-free
    tokens separates 32 positives from the same 32 images queued as negatives no better than chance allows."""
    model = _model(tiny_model_config, tiny_tokenizer, itm_negatives="queue")
    model.set_lora_trainable(True)  # phase 2, LoRA not zero: its dropout is noise too
    with torch.no_grad():
        for name, p in model.lora_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = tiny_batch(tiny_tokenizer, 32)
    model.train()
    model(**batch)  # the queue now holds these 32 images
    negatives = model.queue.image_tokens[:32]
    positives = model.encode_image(batch["pixel_values"])["image_tokens"].detach()
    model.eval()
    clean = model.encode_image(batch["pixel_values"])["image_tokens"].detach()
    noise = torch.cat([(t.float() - clean).abs().mean(dim=(1, 2)) for t in (positives, negatives)])
    is_positive = torch.arange(64) < 32
    best = max(max(((noise >= t) == is_positive).float().mean(), ((noise < t) == is_positive).float().mean())
               for t in noise)
    assert best < 0.8, f"dropout noise alone separates positives from negatives ({best:.0%})"


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(tiny_model_config, tiny_tokenizer):
    """Phase 2 with dropout everywhere: the same losses and gradients with activations recomputed as kept; and
    recomputed they are (each encoder and text block runs twice a step)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    results, calls = {}, {}
    for checkpointing in (False, True):
        model = _model(tiny_model_config, tiny_tokenizer)
        model.set_lora_trainable(True)
        with torch.no_grad():
            for name, p in model.lora_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        model.set_gradient_checkpointing(checkpointing)
        counted = {"vision": 0, "text": 0}  # calls of the blocks' submodules: a recomputed block calls them again
        for part in counted:
            for block in getattr(model, part).modules():
                if isinstance(block, GradientCheckpointingLayer):
                    for child in block.children():
                        child.register_forward_hook(lambda *_, part=part: counted.__setitem__(part, counted[part] + 1))
        model.train()
        torch.manual_seed(1)
        out = model(**tiny_batch(tiny_tokenizer, 4))
        out["loss"].backward()
        results[checkpointing] = ({k: out[k].detach() for k in ("loss_itc", "loss_itm", "loss_lm")},
                                  {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        calls[checkpointing] = dict(counted)
    (losses, grads), (losses_ckpt, grads_ckpt) = results[False], results[True]
    assert losses == losses_ckpt or all(torch.equal(losses[k], losses_ckpt[k]) for k in losses)
    assert grads.keys() == grads_ckpt.keys() and any("lora_" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(calls[True][part] > calls[False][part] > 0 for part in ("vision", "text")), calls


@pytest.mark.parametrize("itm_negatives", ["batch", "queue"])
def test_a_word_for_word_caption_of_another_image_is_never_an_itm_negative(tiny_model_config, tiny_tokenizer,
                                                                          itm_negatives):
    """Two images, one caption: the caption describes both, so neither pairing is a negative and ITM's loss is
    its positives' alone; with same_caption_positive off (ALBEF) each image's twin caption is its negative."""
    batch = tiny_batch(tiny_tokenizer, 2)
    batch["input_ids"][1], batch["attention_mask"][1] = batch["input_ids"][0], batch["attention_mask"][0]
    for same_caption_positive in (True, False):
        model = _model(tiny_model_config, tiny_tokenizer, itm_negatives=itm_negatives,
                       same_caption_positive=same_caption_positive).eval()
        if itm_negatives == "queue":  # the queue holds this same batch
            model.train()
            model(**batch)
            model.eval()
            assert model.queue.caption_ids[0] == model.queue.caption_ids[1] >= 0
        out = model(**batch)
        image = model.encode_image(batch["pixel_values"])
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        logits = model.itm_logits(image["image_tokens"], text["text_states"], batch["attention_mask"])
        positives_only = torch.nn.functional.cross_entropy(logits.float(), torch.ones(2, dtype=torch.long))
        assert torch.isclose(out["loss_itm"], positives_only, atol=1e-6) == same_caption_positive


def test_momentum_encoder_is_an_ema_of_lora_over_the_shared_backbone(tiny_model_config, tiny_tokenizer):
    """loss.momentum_encoder: the copy holds only LoRA weights of its own; in phase 1 it changes nothing (the
    losses equal the run without it); in phase 2 its LoRA follows the online LoRA by EMA and its features feed the
    queue; the checkpoint keeps its LoRA, not the backbone twice."""
    plain = _model(tiny_model_config, tiny_tokenizer)
    model = _model(tiny_model_config, tiny_tokenizer, momentum_encoder=True)
    online = dict(model.vision.named_parameters())
    for name, p in model.vision_m.named_parameters(remove_duplicate=False):
        assert (p is online[name]) == ("lora_" not in name), name
        assert not p.requires_grad
    assert {n for n, _ in model.named_parameters()} - {n for n, _ in plain.named_parameters()} == \
        {f"vision_m.{n}" for n, _ in model.vision.lora_parameters()}
    saved = model.checkpoint_state_dict()
    assert not model.cfg.vision.random_init
    assert {k for k in saved if k.startswith("vision_m.")} == {f"vision_m.{n}" for n, _ in model.vision.lora_parameters()}

    batch = tiny_batch(tiny_tokenizer, 4)
    for m in (plain, model):
        torch.manual_seed(3)
        m.train()
        m.out = m(**batch)
    for key in ("loss_itc", "loss_itm", "loss_lm"):
        assert torch.equal(model.out[key], plain.out[key]), key

    model.set_lora_trainable(True)
    optimizer = torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=0.5)
    model(**batch)["loss"].backward()
    optimizer.step()  # the online LoRA moves
    lora_m = [p for _, p in model.vision_m.lora_parameters()]
    before = [p.detach().clone() for p in lora_m]
    online = [p.detach().clone() for _, p in model.vision.lora_parameters()]
    model(**batch)  # its EMA step, towards the trained LoRA
    mu = model.cfg.loss.momentum
    assert any(not torch.equal(a, b) for a, b in zip(before, lora_m))
    for now, b, o in zip(lora_m, before, online):
        torch.testing.assert_close(now, mu * b + (1 - mu) * o)
    with torch.no_grad():
        model.eval()
        pixels = batch["pixel_values"]
        assert not torch.allclose(model.vision_m(pixels), model.vision(pixels))


def _memory_model(cfg, tokenizer, **memory):
    torch.manual_seed(0)
    memory_cfg = dataclasses.replace(cfg.memory, enabled=True, slots=8, dim=16, episode_size=4, **memory)
    return VisionLanguageModel(dataclasses.replace(cfg, memory=memory_cfg), tokenizer)


def test_memory_trains_through_the_step_and_captions_read_a_written_memory(tiny_model_config, tiny_tokenizer):
    model = _memory_model(tiny_model_config, tiny_tokenizer).train()
    out = model(**tiny_batch(tiny_tokenizer, 6))  # 6 pairs: episodes of 4 and of 2 (+2 empty)
    assert torch.isfinite(out["loss_memory_lm"]) and torch.isfinite(out["loss_memory_kl"])
    w = model.cfg
    expected = (w.loss.itc_weight * out["loss_itc"] + w.loss.itm_weight * out["loss_itm"]
                + w.loss.lm_weight * (out["loss_lm"] + out["loss_memory_lm"]) + w.memory.kl_weight * out["loss_memory_kl"])
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    for name, p in model.memory.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.parameter_budget()["memory"] == sum(p.numel() for p in model.memory.parameters())

    model.eval()
    batch = tiny_batch(tiny_tokenizer, 3, seed=2)
    state = model.write_memory(batch["pixel_values"], ["a red circle above a yellow square"] * 3)
    assert state.memory.shape == (1, 8, 16)
    with_memory = model.generate(batch["pixel_values"], max_new_tokens=4, memory=state)
    assert len(with_memory) == 3 and all(isinstance(c, str) for c in with_memory)
    # Writing then forgetting a pair one at a time gives the memory back.
    more = tiny_batch(tiny_tokenizer, 1, seed=3)
    added = model.write_memory(more["pixel_values"], ["a blue square"], state=state)
    restored = model.write_memory(more["pixel_values"], ["a blue square"], state=added, forget=True)
    assert not torch.allclose(added.memory, state.memory)
    torch.testing.assert_close(restored.memory, state.memory, rtol=1e-3, atol=1e-3)
    plain = _model(tiny_model_config, tiny_tokenizer).eval()
    with pytest.raises(ValueError, match="has no memory"):
        plain.generate(batch["pixel_values"], memory=state)


def test_generate_greedy_and_beam(tiny_model_config, tiny_tokenizer):
    model = _model(tiny_model_config, tiny_tokenizer).eval()
    pixels = tiny_batch(tiny_tokenizer, 3)["pixel_values"]
    greedy = model.generate(pixels, max_new_tokens=5)
    beams = model.generate(pixels, max_new_tokens=5, num_beams=2)
    assert len(greedy) == len(beams) == 3 and all(isinstance(c, str) for c in greedy + beams)
    assert model.generate(pixels[:1], max_new_tokens=5) == greedy[:1]


def test_checkpoint_state_keeps_lora_and_drops_pretrained_base(tiny_model_config, tiny_tokenizer):
    model = _model(tiny_model_config, tiny_tokenizer)
    keys = model.checkpoint_state_dict().keys()
    lora_keys = {f"{n}" for n, _ in model.lora_parameters()}
    assert lora_keys <= set(keys), "LoRA A and B must be saved even while frozen"
    assert not any(k.startswith("vision.") and "lora_" not in k for k in keys)
    assert {"queue.image_feats", "compressor_m.net.0.weight", "temperature"} <= set(keys)


def test_generate_with_static_cache_matches_dynamic(tiny_model_config, tiny_tokenizer):
    """compile=True decodes with static caches (compiled by generate() on a GPU only); the captions are the same,
    also on a second call through the reset cache, and a different batch size gets its own cache."""
    model = _model(tiny_model_config, tiny_tokenizer).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a random model's captions barely depend on the image: make them
        model.image_to_text.weight.mul_(30.0)
        model.text.lm_head.weight.mul_(5.0)
    first, second = (tiny_batch(tiny_tokenizer, 4, seed=s)["pixel_values"] for s in (0, 1))
    kwargs = dict(max_new_tokens=8, min_new_tokens=8)
    dynamic = [model.generate(p, **kwargs) for p in (first, second)]
    assert dynamic[0] != dynamic[1] and len(set(dynamic[0])) > 1, "captions must depend on the image"
    assert [model.generate(p, compile=True, **kwargs) for p in (first, second)] == dynamic
    assert len(model._decoding_caches) == 1
    assert model.generate(first[:2], compile=True, **kwargs) == dynamic[0][:2]
    assert len(model._decoding_caches) == 2


@pytest.mark.parametrize("itm_negatives", ["batch", "queue"])
def test_whole_forward_compiles_once_per_phase_and_matches_eager(tiny_model_config, tiny_tokenizer, itm_negatives):
    """compile(scope="forward"): one graph for the whole training forward while the queue fills (the queue is
    masked, not sliced) and the caption width changes, one more when LoRA starts training; losses, gradients, queue
    and momentum copies as eager. aot_eager traces forward and backward as inductor would, without its CPU
    compile time."""
    import torch.nn.functional as F
    from torch._dynamo.testing import CompileCounterWithBackend

    text = dataclasses.replace(tiny_model_config.text, dropout=0.0, max_length=16)  # room for wider batches
    cfg = dataclasses.replace(tiny_model_config, text=text,
                              compressor=dataclasses.replace(tiny_model_config.compressor, dropout=0.0))
    eager = _model(cfg, tiny_tokenizer, itm_negatives=itm_negatives, momentum=0.5).train()
    compiled = _model(cfg, tiny_tokenizer, itm_negatives=itm_negatives, momentum=0.5).train()
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled.compile(scope="forward", backend=counter)
    for step in range(4):
        if step == 3:
            for model in (eager, compiled):
                model.set_lora_trainable(True)
        grads = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same hard-negative draws
            batch = tiny_batch(tiny_tokenizer, 4, image_ids=[4 * step + i for i in range(4)], seed=step)
            pad = step  # widths 12, 13, 14, 15: batches are padded to their longest caption
            batch["input_ids"] = F.pad(batch["input_ids"], (0, pad), value=tiny_tokenizer.pad_id)
            batch["attention_mask"] = F.pad(batch["attention_mask"], (0, pad))
            out = model(**batch)
            out["loss"].backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            with torch.no_grad():  # a stand-in optimizer step, so that the momentum copies drift from the online
                for p in model.parameters():
                    if p.grad is not None:
                        p.sub_(0.1 * p.grad)
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)
        assert counter.frame_count == (1 if step < 3 else 2), step
    assert any(n.startswith("vision.") and "lora_" in n for n in grads[1])  # phase 2 reaches LoRA
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)  # queue, momentum copies, weights
    assert int(compiled.queue.filled) == 16


def test_temperature_keeps_its_gradient_at_the_bound_and_is_clamped_after_the_step(tiny_model_config,
                                                                                    tiny_tokenizer):
    """ALBEF clamps the ITC temperature itself after each optimizer step: at its bound the forward still gives it a
    gradient (a clamp inside the forward gave none outside the range, so it could never come back), and the
    trainer's step puts an overshooting value back at the bound."""
    from collections import Counter

    from loravl.config import TrainConfig
    from loravl.device import choose_precision
    from loravl.optim import build_optimizer
    from loravl.runtime import DistributedEnv
    from loravl.train import train_step

    loss = tiny_model_config.loss
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_model_config, tiny_tokenizer).train()
    with torch.no_grad():
        model.temperature.fill_(loss.min_temperature)
    model(**tiny_batch(tiny_tokenizer, seed=2))["loss"].backward()
    assert model.temperature.grad is not None and model.temperature.grad.abs() > 0
    # A step far too large for the temperature: it leaves the range, and the step clamps it back.
    tc = TrainConfig(lr=10.0, max_grad_norm=0.0, weight_decay=0.0)
    env = DistributedEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    optimizer = build_optimizer(model, tc, env.device)
    model.zero_grad()
    train_step(model, [{**tiny_batch(tiny_tokenizer, seed=3), "skipped": Counter()}], optimizer,
               choose_precision("no", env.device), tc, env)
    assert loss.min_temperature <= float(model.temperature) <= loss.max_temperature
    assert any(float(model.temperature) == pytest.approx(bound) for bound in (loss.min_temperature,
                                                                              loss.max_temperature))


def test_accumulated_micro_batches_move_the_momentum_copies_as_one_batch(tiny_model_config, tiny_tokenizer):
    """Two accumulated micro-batches of 4 take one momentum step, as one batch of 8 does (not momentum**2), and
    enqueue the same number of features; the trainer takes that step itself, once per optimizer step."""
    from collections import Counter

    from loravl.config import TrainConfig
    from loravl.device import choose_precision
    from loravl.optim import build_optimizer
    from loravl.runtime import DistributedEnv
    from loravl.train import train_step

    cfg = dataclasses.replace(tiny_model_config, loss=dataclasses.replace(tiny_model_config.loss, momentum=0.5))
    tc, env = TrainConfig(lr=1e-3), DistributedEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    whole = tiny_batch(tiny_tokenizer, batch_size=8, seed=5)
    halves = [{k: v[i:i + 4] for k, v in whole.items()} for i in (0, 4)]
    results = {}
    for name, micro_batches in (("one batch", [whole]), ("accumulated", halves)):
        torch.manual_seed(0)
        model = VisionLanguageModel(cfg, tiny_tokenizer).train()
        with torch.no_grad():  # online and momentum weights apart, so that a momentum step shows
            for p in model._momentum_params[0]:
                p.add_(0.1)
        model.momentum_in_forward = False
        optimizer = build_optimizer(model, tc, env.device)
        train_step(model, [{**b, "skipped": Counter()} for b in micro_batches], optimizer,
                   choose_precision("no", env.device), tc, env)
        results[name] = ([p.detach().clone() for p in model._momentum_params[1]], int(model.queue.filled))
    for a, b in zip(results["one batch"][0], results["accumulated"][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert results["one batch"][1] == results["accumulated"][1] == 8
