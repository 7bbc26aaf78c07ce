"""The frequency-prompt Personalizer (paper section 3.2, Eq. 4-6, Figure 2).

From the harmonized features X (B, D, H, W), a latent z from the prior and a bank of M_z prior samples, it
produces one rater-adaptive latent z'_i per rater; the shared sampling head turns z'_i into rater i's
segmentation. The steps, and how the paper's wording is read where it leaves room:

1. ``X~ = X W_d`` (1x1, D -> D/4), Haar DWT: X_LL and the high-frequency bands X_H = [X_LH, X_HL, X_HH]
   (D' = 3D/4 channels at H/2 x W/2).
2. The prompt (Eq. 4): N learnable components P_c, stored at ``prompt_size`` and interpolated to the
   sub-band size (PromptIR style), mixed by ``w = Softmax(PWC(X_H))`` and scaled by rater i's learnable
   weights c_i, then a 3x3 conv. *Reading*: Eq. 4 sums over c = 1..D' with w in R^{D'}, but combines N
   components; w here is one weight per component (the pointwise conv has N outputs, pooled over
   positions), and ``c_i`` is one weight per (rater, component). The c_i start at 1 plus noise, so the
   raters' prompts differ from the first step.
3. Large Kernel Attention between X_H and the prompt, then a 1x1 conv (Eq. 5): X'_H, one per rater.
4. A 3x3 conv over [X'_H, X_LL]: the local feature X_d.
5. Cross-attention with the pooled X_d as the query and the bank of prior samples as keys and values.
   *Reading*: the paper's "person-specific tokens": rater i's query is the pooled X_d projected, plus a
   learnable token t_i of rater i. Through c_i alone rater identity barely reached z' (a rater-scaled
   prompt that only gates the detail bands, then mean-pooled: max |z'_r - z'_0| was 6e-7 on real
   features); the token gives each rater its own attention over the bank and its own offset.
6. The IDWT of [X_LL, X'_H] re-synthesizes a full-spectrum feature. *Reading*: "the resulting feature" is
   pooled per channel by its mean *and* its root mean square. A plain spatial mean after an orthonormal
   IDWT is the mean of the low band alone, so X'_H would never reach z'; the RMS carries the energy of
   every band (Parseval), so the refined details do.
7. A linear map of [attention output, pooled feature, t_i] to Delta_i, and z'_i = z + Delta_i: the prior's
   latent is the starting point, and the map starts small and random (not at zero), so raters start apart
   but near the prior. *Reading*: appendix K says phase 2 adapts "the prior latent z ~ p(z|x)"; the heads
   (:meth:`HarmonizerNet.personalize`) use the prior's mean. Delta_i does not see z, so a sample's noise is
   added to every rater's latent during training; by default the trainer anneals it to the mean over the
   first half of phase 2 (``TrainConfig.phase2_z`` says why and what was measured).

The DWT and IDWT are the package's Haar ops. Paper config: about 0.07 M parameters (the paper's figure).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.haar import haar_dwt2d, haar_idwt2d
from .cpu_paths import eager_cpu

RMS_EPS = 1e-6  # keeps the RMS pooling's gradient finite for an all-zero feature


def _nhwc(x: Tensor) -> Tensor:
    """x in channels-last memory order (same values and shape). oneDNN's depthwise, dilated and narrow
    (12-32 channel) convolutions are several times faster on it than on NCHW: on 2 Xeon cores, at the
    paper config's B R = 64 maps of 12 x 64 x 64, the 7x7 dilation-3 depthwise conv takes 15 ms instead
    of 51 (forward + backward 53 instead of 184) and the 3x3 16 -> 32 conv 16 instead of 26."""
    return x.contiguous(memory_format=torch.channels_last)


def _dilated_depthwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for a depthwise, dilated, "same"-padded conv, computed as an undilated conv on the
    d x d polyphase components of x (space-to-batch, as atrous convolution is usually implemented): output
    pixel (q d + r, p d + s) only reads input pixels of the same residues (r, s), so each component is an
    ordinary k x k depthwise conv of its own, and the zeros padded to a multiple of d stand for the conv's
    zero padding. The same weights and the same k^2 products per output (their float sum may round
    differently: 0 to 1e-5 here). Why: oneDNN has no fast kernel for dilated depthwise convs on AVX2. At
    the paper config's 64 maps of 12 x 64 x 64 on 2 Zen 4 cores, the 7x7 dilation-3 conv took 62 ms forward
    and 436 ms forward + backward under the AVX2 build (20 and 75 ms under AVX-512, 68 and 454 under
    SSE4.1); as components it takes 11 and 48 ms (7 and 55 under AVX-512, 15 and 91 under SSE4.1).

    Under torch.compile and torch.export the dilated conv itself is traced: the padding to a multiple of d
    puts a ceil-division of a dynamic size into the graph, which export cannot prove, and a compiled or
    exported graph (ONNX included) is better served by the one standard op. On a GPU (not measured) the
    dilated conv runs too."""
    if not eager_cpu(x):
        return conv(x)
    d, k = conv.dilation[0], conv.kernel_size[0]
    n, c, h, w = x.shape
    hq, wq = -(-h // d), -(-w // d)
    xl = _nhwc(x).permute(0, 2, 3, 1)  # (n, h, w, c), contiguous
    xl = F.pad(xl, (0, 0, 0, wq * d - w, 0, hq * d - h))
    parts = xl.reshape(n, hq, d, wq, d, c).permute(0, 2, 4, 1, 3, 5).reshape(n * d * d, hq, wq, c)
    y = F.conv2d(parts.permute(0, 3, 1, 2), _nhwc(conv.weight), conv.bias, padding=k // 2, groups=c)
    y = y.permute(0, 2, 3, 1).reshape(n, d, d, hq, wq, c).permute(0, 3, 1, 4, 2, 5).reshape(n, hq * d, wq * d, c)
    return y[:, :h, :w].permute(0, 3, 1, 2)


class LargeKernelAttention(nn.Module):
    """LKA (Guo et al., Visual Attention Network): 5x5 depthwise, 7x7 depthwise dilated 3, 1x1; the result
    gates the input. Here the attention is computed from the bands plus the prompt and gates the bands."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.dw_dilated = nn.Conv2d(channels, channels, 7, padding=9, dilation=3, groups=channels)
        self.pw = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, prompt: Tensor) -> Tensor:
        return x * self.pw(_dilated_depthwise(self.dw_dilated, self.dw(_nhwc(x + prompt))))


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
        self.rater_weights = nn.Parameter(1.0 + 0.5 * torch.randn(num_raters, components))  # c_i
        self.pwc = nn.Conv2d(d_high, components, 1)
        self.prompt_conv = nn.Conv2d(d_high, d_high, 3, padding=1)
        self.attention = LargeKernelAttention(d_high)
        self.post = nn.Conv2d(d_high, d_high, 1)
        self.local = nn.Conv2d(d_high + c4, hidden, 3, padding=1)
        self.rater_tokens = nn.Parameter(torch.randn(num_raters, attn_dim))  # t_i
        self.q = nn.Linear(hidden, attn_dim)
        self.k = nn.Linear(latent_dim, attn_dim)
        self.v = nn.Linear(latent_dim, attn_dim)
        self.fuse = nn.Linear(2 * attn_dim + 2 * c4, latent_dim)
        nn.init.normal_(self.fuse.weight, std=0.1 * self.fuse.in_features**-0.5)
        nn.init.zeros_(self.fuse.bias)
        # Optimizer steps of phase 2 so far (the trainer counts them; saved with the weights), so that heads of
        # a personalizer that never trained are not passed off as personalized predictions.
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.int64))

    def bands(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """X_LL ``(B, D/4, h, w)`` and X_H ``(B, 3D/4, h, w)`` of the reduced features (step 1)."""
        y = haar_dwt2d(self.reduce(features))  # (B, D/4, 4, h, w): cA, cH, cV, cD
        return y[:, :, 0], y[:, :, 1:].flatten(1, 2)

    def refine(self, high: Tensor, raters: Tensor) -> Tensor:
        """X'_H for each image and rater, ``(B R', 3D/4, h, w)`` (steps 2-3, Eq. 4-5)."""
        mix = torch.softmax(self.pwc(high).mean((2, 3)), dim=1)  # w: (B, N)
        comps = F.interpolate(self.prompts, size=high.shape[-2:], mode="bilinear", align_corners=False)
        coeff = mix[:, None, :] * self.rater_weights[raters][None]  # (B, R', N): w * c_i
        prompt = self.prompt_conv(_nhwc(torch.einsum("brn,nchw->brchw", coeff, comps).flatten(0, 1)))
        return self.post(self.attention(high.repeat_interleave(raters.numel(), dim=0), prompt))

    def latent(self, low: Tensor, refined: Tensor, z: Tensor, bank: Tensor, raters: Tensor) -> Tensor:
        """z'_i ``(B, R', latent)`` from X_LL, the refined bands X'_H of every rater, z and the bank (4-7)."""
        r = raters.numel()
        low_r = low.repeat_interleave(r, dim=0)
        local = F.relu(self.local(_nhwc(torch.cat([refined, low_r], dim=1))))  # X_d
        token = self.rater_tokens[raters].repeat(low.shape[0], 1)  # (B R', A), image-major like everything here
        q = self.q(local.mean((2, 3))) + token
        bank_r = bank.repeat_interleave(r, dim=0)
        attn = torch.softmax(torch.einsum("ba,bma->bm", q, self.k(bank_r)) / q.shape[1] ** 0.5, dim=1)
        ctx = torch.einsum("bm,bma->ba", attn, self.v(bank_r))
        c4 = low.shape[1]
        full = haar_idwt2d(torch.cat([low_r[:, :, None], refined.reshape(-1, c4, 3, *refined.shape[-2:])], dim=2))
        pooled = torch.cat([full.mean((2, 3)), (full.square().mean((2, 3)) + RMS_EPS).sqrt()], dim=1)
        delta = self.fuse(torch.cat([ctx, pooled, token], dim=1))
        return z.repeat_interleave(r, dim=0).add(delta).reshape(low.shape[0], r, -1)

    def forward(self, features: Tensor, z: Tensor, bank: Tensor, raters: Tensor) -> Tensor:
        """Rater-adaptive latents ``(B, R', latent_dim)``.

        features ``(B, D, H, W)`` (even H, W); z ``(B, latent_dim)``; bank ``(B, M_z, latent_dim)`` of prior
        samples; raters: long tensor of the R' rater indices to produce.
        """
        low, high = self.bands(features)
        return self.latent(low, self.refine(high, raters), z, bank, raters)
