import pytest
import torch

from loravl.config import ConfigError, MemoryConfig
from loravl.memory import EpisodicMemory, MemoryState, pseudo_inverse


def _memory(**overrides) -> EpisodicMemory:
    torch.manual_seed(0)
    return EpisodicMemory(MemoryConfig(**{"slots": 32, "dim": 128, **overrides}))


@pytest.mark.parametrize("shape", [(3, 16, 32), (3, 32, 16), (2, 1, 32), (1, 32, 128)])
def test_pseudo_inverse_iteration_equals_pinv_on_well_conditioned_matrices(shape):
    g = torch.Generator().manual_seed(0)
    m, n = shape[-2:]
    # Singular values in [1, 3]: the iteration's error squares each step.
    u = torch.linalg.qr(torch.randn(shape[0], m, m, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(shape[0], n, n, generator=g, dtype=torch.float64))[0]
    s = torch.zeros(shape, dtype=torch.float64)
    k = min(m, n)
    s[:, range(k), range(k)] = 1 + 2 * torch.rand(shape[0], k, generator=g, dtype=torch.float64)
    a = u @ s @ v.transpose(-2, -1)
    torch.testing.assert_close(pseudo_inverse(a, 20), torch.linalg.pinv(a), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pseudo_inverse(a.float(), 20), torch.linalg.pinv(a).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("episode_size", [1, 4, 16, 32])
def test_written_latents_read_back_exactly_up_to_k_and_approximately_beyond(episode_size):
    memory = _memory().eval()
    latents = torch.randn(3, episode_size, 128, generator=torch.Generator().manual_seed(1))
    read = memory.read(latents, memory.write(latents))["latents"]
    error = ((read - latents).norm(dim=-1) / latents.norm(dim=-1)).max()
    assert error < 1e-3, error
    # More latents than slots: the least-squares memory reads back only their best K-dimensional fit.
    many = torch.randn(3, 96, 128, generator=torch.Generator().manual_seed(2))
    read = memory.read(many, memory.write(many))["latents"]
    relative = ((read - many).norm() / many.norm()).item()
    assert 0.3 < relative < 0.95, relative


def test_a_query_reads_what_was_written_at_it_and_not_another_episode():
    """Episodes are separate memories: each query recalls its own episode's latent, not another episode's."""
    memory = _memory().eval()
    latents = torch.randn(4, 8, 128, generator=torch.Generator().manual_seed(3))
    state = memory.write(latents)
    read = memory.read(latents, state)["latents"]
    similarity = torch.nn.functional.cosine_similarity(read[:, None], latents[None, :], dim=-1)  # [E, E, N]
    assert bool((similarity.diagonal(dim1=0, dim2=1) > 0.999).all())
    assert similarity.masked_select(~torch.eye(4, dtype=torch.bool)[:, :, None].expand(-1, -1, 8)).abs().max() < 0.5


@pytest.mark.parametrize("start", ["empty", "written"])
def test_sequential_write_then_forget_restores_the_memory(start):
    memory = _memory(noise=0.1).double().eval()
    g = torch.Generator().manual_seed(4)
    state = memory.empty(2) if start == "empty" else memory.write(torch.randn(2, 8, 128, generator=g,
                                                                                dtype=torch.float64))
    item = torch.randn(2, 128, generator=g, dtype=torch.float64)
    written = memory.update(state, item, sign=+1)
    recalled = memory.read(item[:, None], written)["latents"][:, 0]
    before = memory.read(item[:, None], state)["latents"][:, 0]
    assert (recalled - item).norm() < 0.5 * (before - item).norm()  # the write moved the memory towards it
    forgotten = memory.update(written, item, sign=-1)
    torch.testing.assert_close(forgotten.memory, state.memory, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(forgotten.covariance, state.covariance, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("read_noise", [False, True])
def test_one_latent_one_episode_bf16_autocast_and_gradients(read_noise):
    memory = _memory(read_noise=read_noise).train()
    latents = torch.randn(1, 1, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = memory.read(latents, memory.write(latents))
    assert out["latents"].shape == (1, 1, 128) and out["weights"].dtype == torch.float32
    assert torch.isfinite(out["latents"]).all() and torch.isfinite(out["kl"])
    (out["latents"].float().pow(2).sum() + out["kl"]).backward()
    assert (memory.read_logvar is not None) == read_noise
    for p in (memory.prior_memory, latents, *([memory.read_logvar] if read_noise else [])):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_memory_state_saves_and_loads(tmp_path):
    memory = _memory().eval()
    state = memory.write(torch.randn(2, 4, 128))
    state.save(tmp_path / "m.safetensors")
    loaded = MemoryState.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded.memory, state.memory) and torch.equal(loaded.covariance, state.covariance)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors: not a memory state"):
        MemoryState.load(tmp_path / "other.safetensors")


def test_memory_config_names_a_wrong_field():
    with pytest.raises(ConfigError, match="slots"):
        MemoryConfig(slots=0).validate("model.memory")


def test_a_key_reads_back_the_value_written_with_it():
    """Addressed by keys (the first half), a written key alone reads back its own latent, value included, up to
    min(K, key_dim) pairs an episode."""
    memory = EpisodicMemory(MemoryConfig(slots=32, dim=128), key_dim=64).eval()
    latents = torch.randn(3, 32, 128, generator=torch.Generator().manual_seed(5))
    read = memory.read(latents[..., :64], memory.write(latents))["latents"]
    torch.testing.assert_close(read, latents, rtol=1e-3, atol=1e-3)
    # Autoassociative addressing (every number) cannot recover a value from its key alone.
    plain = EpisodicMemory(MemoryConfig(slots=32, dim=128)).eval()
    keys_only = torch.cat([latents[..., :64], torch.zeros_like(latents[..., 64:])], dim=-1)
    missed = plain.read(keys_only, plain.write(latents))["latents"][..., 64:]
    assert (missed - latents[..., 64:]).norm() > 0.3 * latents[..., 64:].norm()
