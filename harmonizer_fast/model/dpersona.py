"""D-Persona's stage-2 personalization, the paper's strongest baseline (Tables 1-3), as a drop-in for the
frequency-prompt Personalizer on the same frozen phase-1 model (``HarmonizerConfig(personalizer="dpersona")``).

Wu et al., "Diversified and Personalized Multi-rater Medical Image Segmentation", CVPR 2024; read from the
authors' code (github.com/ycwu1997/D-Persona: ``code/lib/DPersona.py``, ``train_dp.py``,
``lib/initialize_optimization.py``). Per rater i, a projection head:

1. a small conv block over the final decoder features f (the 16 channels fcomb reads): two 3x3 convs per
   stage at widths 32, 16 and latent_dim, ReLU after each, channel dropout 0.1 after each stage's first conv,
   2x2 average pooling between stages;
2. global average pooling: the query q_i, ``(B, latent_dim)``, non-negative after the last ReLU;
3. softmax matching against the bank of M_z prior samples: w_m = softmax_m(q_i . z_m) (no temperature);
4. z'_i = sum_m w_m z_m, decoded by the frozen fcomb.

The prior latent z itself is not used: D-Persona's expert latent is a convex combination of bank samples.

The published recipe, and what the package keeps of it: only the heads train (phase 2 freezes the rest);
a bank of :data:`BANK` = 100 prior samples (``prior_bank``; ``--personalizer dpersona`` sets it); the loss a
generalized Dice over the R heads (:func:`harmonizer_fast.losses.dpersona_loss`); the model selected by the
mean per-rater Dice (the trainer's phase-2 default, ``dice_mean``). Departures, each for a reason:

- D-Persona selects on its test loader; here on the validation patients, like every variant.
- Adam at lr 1e-4 with cosine annealing over 100 GPU epochs; here AdamW with the same cosine rule as the
  frequency-prompt Personalizer, at a rate chosen on validation (``--lr2``; at 1e-4 the few epochs of a CPU
  budget would leave the heads at their initialization). On LIDC's all-raters protocol, fold 0, 20 epochs on
  the Prob. U-Net of 30: validation Dice_mean 0.7949 at 3e-3 against 0.7929 at the preset's 1e-2 (README,
  Table 2 over three folds); at either rate it moves by less than 0.01 after the first epoch (0.785-0.792).
- Their conv block passes 3 as the padding of its 3x3 convs (each conv grows the map by 4 pixels of zeros
  before the global pooling); here the padding is 1, so the pooled query averages image content only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BANK = 100  # D-Persona's bank of prior samples (test_step's sample_num)
DROPOUT = 0.1
WIDTHS = (32, 16)  # D-Persona's Conv_block(16, [32, 16, 6]); the last width is the latent size


def _block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for i, w in enumerate(widths):
        if i:
            layers.append(nn.AvgPool2d(2))
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.Dropout2d(DROPOUT),
                   nn.Conv2d(w, w, 3, padding=1), nn.ReLU()]  # fmt: skip
        c = w
    return nn.Sequential(*layers)


class DPersonaHeads(nn.Module):
    """One projection head per rater; ``forward`` has the Personalizer's signature."""

    def __init__(self, channels: int, latent_dim: int, num_raters: int) -> None:
        super().__init__()
        self.num_raters = num_raters
        self.heads = nn.ModuleList(_block(channels, (*WIDTHS, latent_dim)) for _ in range(num_raters))
        # Optimizer steps of phase 2 (the trainer counts them, as for the Personalizer).
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.int64))

    def queries(self, features: Tensor, raters: Tensor) -> Tensor:
        """q_i ``(B, R', latent)``: each listed rater's head, globally average-pooled (steps 1-2)."""
        return torch.stack([self.heads[int(r)](features).mean((2, 3)) for r in raters.tolist()], dim=1)

    def forward(self, features: Tensor, z: Tensor, bank: Tensor, raters: Tensor) -> Tensor:
        """Rater latents ``(B, R', latent_dim)``: the softmax-weighted bank ``(B, M_z, latent)`` for each
        head's query (steps 3-4); ``z`` is accepted for the Personalizer's interface and unused."""
        q = self.queries(features, raters)
        weights = torch.softmax(q @ bank.transpose(1, 2), dim=2)  # (B, R', M_z)
        return weights @ bank
