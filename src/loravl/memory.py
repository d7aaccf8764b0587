"""Larimar's generative pseudo-inverse memory (GPM; Das et al., ICML 2024), batched over episodes.

A memory is K slots x C numbers. The only trained parameters are the prior memory M0 (identity-like at init) and
the log-variance of the read weights; every episode's memory is written afresh from M0, so nothing persists
between training steps and nothing can drift apart between DDP replicas.

- ``write(Z)`` (Z: [E, N, C], E episodes of N latents): Zx = Z + noise (training), addresses W0 = Zx M0+,
  memory M = W0+ Zx: the least-squares memory that reads Zx back at W0.
- ``read(Zq, state)``: w = Zq M+ (+ learned noise in training), Z_read = w M, and KL(q(w) || N(0, I)).
- ``update(state, z, sign)``: the Kanerva-machine update of one latent per episode, sign +1 writes it and
  -1 forgets it. It tracks the slots' covariance U: M <- M + c^T (z - w M), U <- U - c^T w U with
  c = w U / (w U w^T + sign * noise^2), which is the Bayesian update by one observation; with sign -1 it removes
  that observation again, so a write then a forget of the same latent restores M and U. Sequential updates
  address with the prior (w = z M0+), as the batch write does, so a forget finds the slots the write used.

Pseudo-inverses come from the Ben-Israel-Cohen iteration (X <- 2X - X A X from X = A^T / ||A||_F^2): batched
matrix products only, on any device, compile-friendly. Memory arithmetic runs in fp32 (or the inputs' wider
dtype), outside autocast.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .config import MemoryConfig


def pseudo_inverse(a: torch.Tensor, steps: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each matrix in ``a`` [..., m, n] -> [..., n, m] by ``steps`` iterations.

    The start X0 = a^T / ||a||_F^2 converges for any a (its scale is below 2 / sigma_max^2), each step squaring
    the error of every singular value; singular values far below the largest converge last, so few steps act as
    a regularised inverse on ill-conditioned input."""
    scale = a.pow(2).sum(dim=(-2, -1), keepdim=True).clamp(min=torch.finfo(a.dtype).tiny)
    x = a.transpose(-2, -1) / scale
    for _ in range(steps):
        x = 2 * x - x @ a @ x
    return x


@dataclass
class MemoryState:
    """Written memories: ``memory`` [E, K, C] and the slots' covariance ``covariance`` [E, K, K]."""

    memory: torch.Tensor
    covariance: torch.Tensor

    def save(self, path: Union[str, Path]) -> None:
        from safetensors.torch import save_file

        save_file({"memory": self.memory.detach().contiguous().cpu(),
                   "covariance": self.covariance.detach().contiguous().cpu()}, str(path))

    @classmethod
    def load(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "MemoryState":
        from safetensors.torch import load_file

        tensors = load_file(str(path), device=str(device))
        missing = {"memory", "covariance"} - set(tensors)
        if missing:
            raise ValueError(f"{path}: not a memory state (no {', '.join(sorted(missing))})")
        return cls(tensors["memory"], tensors["covariance"])


class EpisodicMemory(nn.Module):
    """``key_dim``: address with the first ``key_dim`` numbers of each latent only (default: all of them). Written
    latents [key, value] are then read back from their key alone: reading with a written key returns that latent's
    value exactly while N <= min(K, key_dim) and the keys are independent."""

    def __init__(self, cfg: MemoryConfig, key_dim: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.key_dim = key_dim or cfg.dim
        self.prior_memory = nn.Parameter(torch.eye(cfg.slots, cfg.dim))  # M0, identity-like (Larimar)
        # One learned variance of the read weights, where training reads sample them (cfg.read_noise).
        self.read_logvar = nn.Parameter(torch.zeros(())) if cfg.read_noise else None

    def _compute(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.promote_types(t.dtype, torch.float32))

    def addresses(self, latents: torch.Tensor) -> torch.Tensor:
        """Where latents [E, N, C] (or their keys) go in the prior memory: [E, N, K]."""
        prior = self._compute(self.prior_memory)[:, :self.key_dim]
        return self._compute(latents)[..., :self.key_dim] @ pseudo_inverse(prior, self.cfg.pinv_steps)

    def empty(self, episodes: int) -> MemoryState:
        """The prior as E memories, nothing written (what sequential writes start from)."""
        prior = self._compute(self.prior_memory)
        eye = torch.eye(self.cfg.slots, device=prior.device, dtype=prior.dtype)
        return MemoryState(prior.expand(episodes, -1, -1).clone(), eye.expand(episodes, -1, -1).clone())

    def write(self, latents: torch.Tensor, covariance: bool = True) -> MemoryState:
        """One memory per episode from its latents [E, N, C], any N (N > K: the least-squares fit).
        ``covariance``: also the slots' covariance, which only sequential writes and forgets read (training
        skips its K x K inverse)."""
        with torch.autocast(latents.device.type, enabled=False):
            z = self._compute(latents)
            if self.training:
                z = z + self.cfg.noise * torch.randn_like(z)
            w = self.addresses(z)  # [E, N, K]
            memory = pseudo_inverse(w, self.cfg.pinv_steps) @ z  # [E, K, C]
            # The slots' posterior covariance after observing z at w (prior variance 1): what later sequential
            # writes and forgets weigh themselves against.
            eye = torch.eye(self.cfg.slots, device=z.device, dtype=z.dtype)
            slots_covariance = torch.linalg.inv(eye + w.transpose(-2, -1) @ w / self.cfg.noise ** 2) \
                if covariance else eye.expand(z.shape[0], -1, -1)
        return MemoryState(memory, slots_covariance)

    def read(self, queries: torch.Tensor, state: MemoryState) -> dict[str, torch.Tensor]:
        """Read with queries [E, Q, C] (or [E, Q, key_dim]): ``latents`` [E, Q, C], ``weights`` [E, Q, K] and
        ``kl`` (a scalar, the mean over queries of KL(N(w, var) || N(0, I)) summed over slots)."""
        with torch.autocast(queries.device.type, enabled=False):
            memory = self._compute(state.memory)
            keys = memory[..., :self.key_dim]
            weights = self._compute(queries)[..., :self.key_dim] @ pseudo_inverse(keys, self.cfg.pinv_steps)
            if self.read_logvar is None:  # the prior's variance: only the weights' mean is weighed
                kl = 0.5 * weights.pow(2).sum(dim=-1).mean()
            else:
                logvar = self.read_logvar.float()
                kl = 0.5 * (logvar.exp() + weights.pow(2) - 1 - logvar).sum(dim=-1).mean()
            if self.training and self.read_logvar is not None:
                weights = weights + (0.5 * logvar).exp() * torch.randn_like(weights)
            latents = weights @ memory
        return {"latents": latents.to(queries.dtype), "weights": weights, "kl": kl}

    def update(self, state: MemoryState, latent: torch.Tensor, sign: float = 1.0) -> MemoryState:
        """Write (``sign`` +1) or forget (-1) one latent [E, C] per episode. In float64: a forget's denominator
        is a difference of nearly equal numbers (about noise^4), which fp32 would round away."""
        dtype = state.memory.dtype
        with torch.autocast(latent.device.type, enabled=False):
            z = latent.double()[:, None, :]  # [E, 1, C]
            prior = self.prior_memory.double()[:, :self.key_dim]
            w = z[..., :self.key_dim] @ pseudo_inverse(prior, self.cfg.pinv_steps)  # [E, 1, K]
            memory, covariance = state.memory.double(), state.covariance.double()
            wu = w @ covariance  # [E, 1, K]
            gain = wu / (wu @ w.transpose(-2, -1) + sign * self.cfg.noise ** 2)  # c: [E, 1, K]
            memory = memory + gain.transpose(-2, -1) @ (z - w @ memory)
            covariance = covariance - gain.transpose(-2, -1) @ wu
        return MemoryState(memory.to(dtype), covariance.to(dtype))


class CaptionMemory(nn.Module):
    """The memory as the captioner uses it. A pair (image, caption) is written as one latent [key, value]: a key
    of the image's pooled tokens (the first half) and a value of the caption's <eos> state (the second half). An
    image reads with its key alone, which is all a captioning request has, and the memory addresses by keys
    (``EpisodicMemory(key_dim=...)``), so an image finds the value written with it. The value read reaches the
    captioner as one more cross-attention token beside the image tokens."""

    def __init__(self, cfg: MemoryConfig, image_dim: int, text_dim: int):
        super().__init__()
        self.cfg = cfg
        self.key_dim = cfg.dim // 2
        self.gpm = EpisodicMemory(cfg, key_dim=self.key_dim)
        self.key = nn.Linear(image_dim, self.key_dim)
        self.value = nn.Linear(text_dim, cfg.dim - self.key_dim)
        self.to_text = nn.Linear(cfg.dim - self.key_dim, text_dim)

    def pair_latents(self, image_pooled: torch.Tensor, caption_states: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.key(image_pooled), self.value(caption_states)], dim=-1)

    def query(self, image_pooled: torch.Tensor) -> torch.Tensor:
        return self.key(image_pooled)

    def _episodes(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C] -> [E, N, C], zero-padded: a zero latent adds nothing a least-squares write has to fit."""
        n = self.cfg.episode_size
        episodes = -(-x.shape[0] // n)
        return nn.functional.pad(x, (0, 0, 0, episodes * n - x.shape[0])).view(episodes, n, x.shape[-1])

    def episode_tokens(self, image_pooled: torch.Tensor,
                       caption_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: the batch as episodes of ``episode_size`` pairs, each written, then read by its images.
        The captioner's memory tokens [B, 1, text_dim] and the read's KL."""
        batch = image_pooled.shape[0]
        state = self.gpm.write(self._episodes(self.pair_latents(image_pooled, caption_states)), covariance=False)
        read = self.gpm.read(self._episodes(self.query(image_pooled)), state)
        values = read["latents"][..., self.key_dim:].reshape(-1, self.cfg.dim - self.key_dim)
        return self.to_text(values[:batch])[:, None, :], read["kl"]

    def write(self, image_pooled: torch.Tensor, caption_states: torch.Tensor,
              state: MemoryState | None = None, sign: float = 1.0) -> MemoryState:
        """Inference: the pairs as one episode. A fresh memory written at once, or, given ``state``, each pair
        written (``sign`` +1) or forgotten (-1) in turn."""
        latents = self.pair_latents(image_pooled, caption_states)
        if state is None:
            return self.gpm.write(latents[None])
        for latent in latents:
            state = self.gpm.update(state, latent[None], sign)
        return state

    def tokens(self, image_pooled: torch.Tensor, state: MemoryState) -> torch.Tensor:
        """Inference: each image reads the one written episode; [B, 1, text_dim]."""
        if state.memory.shape[0] != 1:
            raise ValueError(f"captioning reads one memory; this state holds {state.memory.shape[0]}")
        read = self.gpm.read(self.query(image_pooled)[None], state)
        return self.to_text(read["latents"][0, :, self.key_dim:])[:, None, :]
