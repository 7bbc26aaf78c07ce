"""The frequency-prompt Personalizer (paper section 3.2, Eq. 4-6, Figure 2).

From the harmonized features X (B, D, H, W) and a latent z drawn from the prior, it produces one
rater-adaptive latent z'_i per rater, which the shared sampling head turns into rater i's segmentation:

1. ``X~ = X W_d`` (1x1, D -> D/4), Haar DWT: X_LL and the high-frequency bands X_H = [X_LH, X_HL, X_HH]
   (D' = 3D/4 channels at H/2 x W/2);
2. the prompt (Eq. 4): N learnable components P_c, stored at ``prompt_size`` and interpolated to the
   sub-band size (PromptIR style), mixed by w = Softmax(PWC(X_H)) (pooled over positions) and scaled by
   rater i's learnable weights c_i, then a 3x3 conv;
3. Large Kernel Attention between X_H and the prompt, then a 1x1 conv (Eq. 5): X'_H;
4. a 3x3 conv over [X'_H, X_LL]: the local feature X_d;
5. cross-attention with the pooled X_d as query and a bank of M_z prior samples as keys and values;
6. IDWT of [X_LL, X'_H], pooled, fused with the attention output by a linear map to Delta_i; z'_i = z + Delta_i
   (the map starts at zero, so an untrained personalizer leaves z unchanged).

The DWT and IDWT are the package's Haar ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.haar import haar_dwt2d, haar_idwt2d


class LargeKernelAttention(nn.Module):
    """LKA (Guo et al., Visual Attention Network): 5x5 depthwise, 7x7 depthwise dilated 3, 1x1; the result
    gates the input. Here the attention is computed from the bands plus the prompt and gates the bands."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.dw_dilated = nn.Conv2d(channels, channels, 7, padding=9, dilation=3, groups=channels)
        self.pw = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, prompt: Tensor) -> Tensor:
        return x * self.pw(self.dw_dilated(self.dw(x + prompt)))


class Personalizer(nn.Module):
    def __init__(
        self, channels: int, latent_dim: int, num_raters: int, components: int, prompt_size: int,
        attn_dim: int, hidden: int,
    ) -> None:  # fmt: skip
        super().__init__()
        if channels % 4:
            raise ValueError(f"Personalizer: feature channels must be divisible by 4, got {channels}")
        c4 = channels // 4
        d_high = 3 * c4
        self.num_raters = num_raters
        self.reduce = nn.Conv2d(channels, c4, 1)  # W_d
        self.prompts = nn.Parameter(torch.randn(components, d_high, prompt_size, prompt_size) * 0.02)  # P_c
        self.rater_weights = nn.Parameter(torch.ones(num_raters, components))  # c_i
        self.pwc = nn.Conv2d(d_high, components, 1)
        self.prompt_conv = nn.Conv2d(d_high, d_high, 3, padding=1)
        self.attention = LargeKernelAttention(d_high)
        self.post = nn.Conv2d(d_high, d_high, 1)
        self.local = nn.Conv2d(d_high + c4, hidden, 3, padding=1)
        self.q = nn.Linear(hidden, attn_dim)
        self.k = nn.Linear(latent_dim, attn_dim)
        self.v = nn.Linear(latent_dim, attn_dim)
        self.fuse = nn.Linear(attn_dim + c4, latent_dim)
        nn.init.zeros_(self.fuse.weight)
        nn.init.zeros_(self.fuse.bias)
        # Optimizer steps of phase 2 so far (the trainer counts them; saved with the weights), so that heads of
        # a personalizer that never trained are not passed off as personalized predictions.
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.int64))

    def forward(self, features: Tensor, z: Tensor, bank: Tensor, raters: Tensor) -> Tensor:
        """Rater-adaptive latents ``(B, R', latent_dim)``.

        features ``(B, D, H, W)`` (even H, W); z ``(B, latent_dim)``; bank ``(B, M_z, latent_dim)`` of prior
        samples; raters: long tensor of the R' rater indices to produce.
        """
        b, _, h, w = features.shape
        y = haar_dwt2d(self.reduce(features))  # (B, D/4, 4, h/2, w/2): cA, cH, cV, cD
        low = y[:, :, 0]
        high = y[:, :, 1:].flatten(1, 2)  # (B, 3 D/4, h/2, w/2)
        mix = torch.softmax(self.pwc(high).mean((2, 3)), dim=1)  # w: (B, N)
        comps = F.interpolate(self.prompts, size=high.shape[-2:], mode="bilinear", align_corners=False)
        r = raters.numel()
        coeff = mix[:, None, :] * self.rater_weights[raters][None]  # (B, R', N): w * c_i
        prompt = torch.einsum("brn,nchw->brchw", coeff, comps).flatten(0, 1)  # (B R', D', h, w)
        prompt = self.prompt_conv(prompt)
        high_r = high.repeat_interleave(r, dim=0)
        low_r = low.repeat_interleave(r, dim=0)
        refined = self.post(self.attention(high_r, prompt))  # X'_H (Eq. 5)
        local = F.relu(self.local(torch.cat([refined, low_r], dim=1)))  # X_d
        q = self.q(local.mean((2, 3)))  # (B R', A)
        bank_r = bank.repeat_interleave(r, dim=0)
        attn = torch.softmax(torch.einsum("ba,bma->bm", q, self.k(bank_r)) / q.shape[1] ** 0.5, dim=1)
        ctx = torch.einsum("bm,bma->ba", attn, self.v(bank_r))
        c4 = low.shape[1]
        bands = torch.cat([low_r[:, :, None], refined.reshape(-1, c4, 3, *refined.shape[-2:])], dim=2)
        full = haar_idwt2d(bands, size=(h, w)).mean((2, 3))  # (B R', D/4)
        delta = self.fuse(torch.cat([ctx, full], dim=1))
        return z.repeat_interleave(r, dim=0).add(delta).reshape(b, r, -1)
