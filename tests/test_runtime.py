"""loravl.runtime: one process is wrapped in DDP only where train.use_ddp asks."""


def test_use_ddp_wraps_one_process_in_ddp(tiny_model_config, tiny_tokenizer):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from loravl.config import TrainConfig
    from loravl.model import VisionLanguageModel
    from loravl.runtime import init_distributed, wrap_model

    model = VisionLanguageModel(tiny_model_config, tiny_tokenizer)
    env = init_distributed(TrainConfig(cpu=True))
    assert not env.ddp and not dist.is_initialized() and wrap_model(model, env) is model
    env = init_distributed(TrainConfig(cpu=True, use_ddp=True))
    try:
        assert env.ddp and env.world_size == 1 and dist.get_world_size() == 1
        wrapped = wrap_model(model, env)
        assert isinstance(wrapped, DDP) and wrapped.module is model
    finally:
        dist.destroy_process_group()
