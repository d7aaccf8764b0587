"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU).

Each rank trains the tiny model a few steps on its own data, with unequal batch sizes, then writes its ITC queue,
a gradient check of ``gather_with_grad`` and a check of the compiled forward (scope forward) to OUT/rank{r}.pt.
"""
import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]

from transformers import Dinov2Model

from conftest import TINY_CAPTIONS, tiny_batch, tiny_dinov2_config
from loravl import distributed as D
from loravl.config import (CompressorConfig, FusionConfig, LoraConfig, LossConfig, ModelConfig,
                           TextConfig, VisionConfig)
from loravl.model import VisionLanguageModel
from loravl.text import CaptionTokenizer, train_tokenizer


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dinov2 = out / "dinov2"
    if rank == 0:
        torch.manual_seed(0)
        Dinov2Model(tiny_dinov2_config()).save_pretrained(dinov2)
    dist.barrier()

    tokenizer = CaptionTokenizer(train_tokenizer(TINY_CAPTIONS, vocab_size=320), max_length=12)
    cfg = ModelConfig(
        vision=VisionConfig(pretrained=str(dinov2), image_size=28, lora=LoraConfig(rank=4, alpha=8)),
        compressor=CompressorConfig(hidden_dim=24, embed_dim=16),
        text=TextConfig(vocab_size=320, max_length=12, num_layers=2, hidden_size=32, num_heads=2),
        fusion=FusionConfig(num_layers=2, num_heads=2),
        loss=LossConfig(embed_dim=16, queue_size=16),
    )
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg, tokenizer)
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(100 + rank)  # different sampling and dropout on each rank
    batch_size = 4 if rank == 0 else 3  # unequal, as when a rank drops undecodable samples
    losses = []
    for step in range(5):
        ids = torch.arange(batch_size) + 10 * step + 100 * rank  # image ids unique across ranks
        batch = tiny_batch(tokenizer, batch_size, image_ids=ids, seed=step * 2 + rank)
        out_ = ddp(**batch)
        opt.zero_grad()
        out_["loss"].backward()
        opt.step()
        losses.append(out_["loss"].item())

    # gather_with_grad sends each rank the gradient of its own rows, summed over the ranks' losses.
    x = torch.arange(batch_size * 2, dtype=torch.float).view(batch_size, 2).requires_grad_()
    gathered = D.gather_with_grad(x)
    weights = torch.arange(gathered.numel(), dtype=torch.float).view_as(gathered)
    (gathered * weights).sum().backward()
    offset = D.rank_offset(D.gather_batch_sizes(batch_size, x.device))

    # The compiled forward across ranks: the gathers are traced into its one graph (no graph break), and its loss
    # and gradients equal eager's on the same data. Dropout off: compiled code draws its own random numbers.
    from torch._dynamo.testing import CompileCounterWithBackend

    no_dropout = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, dropout=0.0),
                                     compressor=dataclasses.replace(cfg.compressor, dropout=0.0))
    counter = CompileCounterWithBackend("aot_eager")
    forward_check = []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = VisionLanguageModel(no_dropout, tokenizer).train()
        if compiled:
            m.compile(scope="forward", backend=counter)
        torch.manual_seed(200 + rank)  # the same hard-negative draws in both runs
        out_ = m(**tiny_batch(tokenizer, batch_size, image_ids=torch.arange(batch_size) + 100 * rank, seed=rank))
        out_["loss"].backward()
        forward_check.append({"loss": out_["loss"].detach(), "grads": {n: p.grad.clone() for n, p in
                                                                       m.named_parameters() if p.grad is not None}})

    torch.save({
        "forward_frames": counter.frame_count, "forward_eager": forward_check[0],
        "forward_compiled": forward_check[1],
        "queue_image": model.queue.image_feats.clone(), "queue_text": model.queue.text_feats.clone(),
        "queue_ids": model.queue.image_ids.clone(), "filled": int(model.queue.filled),
        "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "gathered_rows": gathered.shape[0], "x_grad": x.grad.clone(),
        "expected_grad": 2 * weights[offset: offset + batch_size], "losses": losses,
    }, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
