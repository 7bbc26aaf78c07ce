"""The Noise Harmonizer (paper section 3.1, Eq. 2-3).

For a decoder feature map f_l, M learnable artifact tokens are the queries of an attention whose keys and
values are projections of f_l over its positions; the attended tokens are averaged (GAP), passed through a
two-layer MLP to (gamma_l, beta_l) per channel, and applied as FiLM: ``f~_l = gamma_l * f_l + beta_l``.
The core (tokens and the MLP's first layer) is shared across decoder layers, which the paper uses as a
cross-scale regularizer (``shared=False`` gives each layer its own, for the supplement's ablation); channel
counts differ per layer, so each layer has thin projections in (its
W_k, W_v) and out (the MLP's second layer to 2 C_l). The out projections start at zero, so an untrained
harmonizer is the identity (gamma = 1, beta = 0). Built on the package's ops: ``token_attention_pool``
(one pass over f_l, no K/V/scores materialized) and ``film`` (fused, deterministic backward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention_pool import token_attention_pool
from ..ops.film import film


class NoiseHarmonizer(nn.Module):
    def __init__(self, channels: Sequence[int], stages: Sequence[int], tokens: int, dim: int, hidden: int,
                 shared: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.stages = tuple(stages)
        self.shared = shared
        if shared:  # the paper's names, so checkpoints of the shared harmonizer keep loading
            self.tokens = nn.Parameter(torch.randn(tokens, dim) * dim**-0.5)  # shared queries t_1..t_M
            self.w1 = nn.Linear(dim, hidden)  # shared first MLP layer W_1
        else:
            self.stage_tokens = nn.ParameterDict(
                {str(s): nn.Parameter(torch.randn(tokens, dim) * dim**-0.5) for s in self.stages}
            )
            self.stage_w1 = nn.ModuleDict({str(s): nn.Linear(dim, hidden) for s in self.stages})
        self.w_k = nn.ParameterDict()
        self.w_v = nn.ParameterDict()
        self.w2 = nn.ModuleDict()
        for s in self.stages:
            c = channels[s]
            self.w_k[str(s)] = nn.Parameter(torch.randn(dim, c) * c**-0.5)
            self.w_v[str(s)] = nn.Parameter(torch.randn(dim, c) * c**-0.5)
            out = nn.Linear(hidden, 2 * c)
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            self.w2[str(s)] = out

    def modulation(self, stage: int, f: Tensor) -> tuple[Tensor, Tensor]:
        """(gamma, beta), each ``(B, C_l)``, for decoder stage ``stage`` (Eq. 2)."""
        key = str(stage)
        tokens, w1 = (self.tokens, self.w1) if self.shared else (self.stage_tokens[key], self.stage_w1[key])
        attended = token_attention_pool(f, tokens, self.w_k[key], self.w_v[key])  # (B, M, Dh)
        h = F.gelu(w1(attended.mean(1)))  # GAP over the tokens, W_1, sigma
        delta_gamma, beta = self.w2[key](h).chunk(2, dim=1)
        return 1.0 + delta_gamma, beta

    def forward(self, stage: int, f: Tensor, record: list[tuple[Tensor, Tensor]]) -> Tensor:
        """FiLM-modulate ``f`` when ``stage`` is harmonized (Eq. 3); the (gamma, beta) go to ``record``."""
        if stage not in self.stages:
            return f
        gamma, beta = self.modulation(stage, f)
        record.append((gamma, beta))
        return film(f, gamma.to(f.dtype), beta.to(f.dtype))


def harmonizer_penalty(params: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """sum_l (||gamma_l - 1||^2 + ||beta_l||^2) of paper Eq. 8, averaged over the batch."""
    if not params:
        return torch.zeros(())
    return sum(((g - 1) ** 2).sum(1).mean() + (b**2).sum(1).mean() for g, b in params)
