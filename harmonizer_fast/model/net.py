"""HarmonizerNet: the Harmonizer Network of arXiv 2605.08210 (paper section 3, docs/architecture.md, "Model").

A probabilistic U-Net (backbone, prior, posterior, sampling head "fcomb") with the Noise Harmonizer
modulating the decoder (3.1) and the frequency-prompt Personalizer turning prior latents into per-rater
latents (3.2). Phase 1 trains everything but the personalizer on Eq. 8; phase 2 freezes all of that and
trains the personalizer on Eq. 6 (``set_phase``). With the harmonizer, the personalizer and the GED loss
switched off in the config, this is the plain probabilistic U-Net.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.distributions import Independent

from .._alloc import check_fits
from .backbone import Backbone
from .budget import plan_network, planning
from .checks import check_images, check_masks
from .config import HarmonizerConfig
from .dpersona import DPersonaHeads
from .fcomb import Fcomb
from .harmonizer import NoiseHarmonizer
from .latent import AxisAlignedConvGaussian, reparameterize, with_masks
from .personalizer import Personalizer


@dataclass
class ModelOutput:
    """What one training forward returns: everything the phase objectives (Eq. 6 and 8) need."""

    phase: int
    features: Tensor
    harmonizer_params: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    prior: Optional[Independent] = None
    posterior: Optional[Independent] = None
    rater_index: Optional[Tensor] = None  # (B,) the rater whose mask the posterior saw (phase 1)
    posterior_logits: Optional[Tensor] = None  # (B, H, W)
    prior_logits: Optional[Tensor] = None  # (B, K, H, W), K = config.ged_samples, for the GED loss
    personalized_logits: Optional[Tensor] = None  # (B, R, H, W) (phase 2)


def _personalizer(c: HarmonizerConfig) -> nn.Module:
    """The configured phase-2 module: both map (features, z, bank, raters) to one latent per rater."""
    if c.personalizer == "dpersona":
        return DPersonaHeads(c.decoder_channels[-1], c.latent_dim, c.num_raters)
    return Personalizer(c.decoder_channels[-1], c.latent_dim, c.num_raters, c.prompt_components, c.prompt_size,
                        c.personalizer_attn_dim, c.personalizer_hidden)  # fmt: skip


PREDICT_HEADS = ("personalized", "identity", "none")


HEADS = ("auto", *PREDICT_HEADS)  # what the workflows (evaluate, predict, export) take


def resolve_heads(model: HarmonizerNet, heads: str, op: str) -> str:
    """A workflow's ``heads`` option as a :meth:`HarmonizerNet.predict` head kind: ``auto`` is the personalized
    heads when phase 2 trained them, else none; asking for personalized heads of an untrained personalizer
    raises (``op`` names the caller in the message)."""
    if heads not in HEADS:
        raise ValueError(f"{op}: heads must be one of {HEADS}, got {heads!r}")
    if heads == "auto":
        return "personalized" if model.personalizer_trained else "none"
    if heads == "personalized" and not model.personalizer_trained:
        raise ValueError(f"{op}: heads='personalized', but this model's personalizer was never trained (or it has "
                         "none): ask for 'identity' or 'none', or train phase 2")  # fmt: skip
    return heads


def _heads_kind(heads: object) -> str:
    if heads is True:
        return "personalized"
    if heads is False:
        return "none"
    if heads not in PREDICT_HEADS:
        raise ValueError(f"predict: heads must be True, False or one of {PREDICT_HEADS}, got {heads!r}")
    return str(heads)


def _check_rater_index(rater_index: object, batch: int, num_raters: int) -> Tensor:
    """``rater_index``: an integer tensor (B,) of raters in [0, num_raters); a ValueError naming it otherwise
    (an out-of-range index used to surface as torch's IndexError from the mask gather)."""
    if not isinstance(rater_index, Tensor) or rater_index.dtype.is_floating_point or rater_index.dtype == torch.bool:
        raise TypeError(f"HarmonizerNet: rater_index must be an integer tensor (B,), got {rater_index!r:.80}")
    if rater_index.shape != (batch,):
        raise ValueError(f"HarmonizerNet: rater_index must have shape ({batch},), got {tuple(rater_index.shape)}")
    if batch and (int(rater_index.min()) < 0 or int(rater_index.max()) >= num_raters):
        raise ValueError(f"HarmonizerNet: rater_index must lie in [0, {num_raters}), got values "
                         f"{int(rater_index.min())}..{int(rater_index.max())}")  # fmt: skip
    return rater_index


class HarmonizerNet(nn.Module):
    def __init__(self, config: HarmonizerConfig) -> None:
        super().__init__()
        if not isinstance(config, HarmonizerConfig):
            raise TypeError(f"HarmonizerNet: config must be a HarmonizerConfig, got {type(config).__name__}")
        if not planning():  # bound the build by the memory available before allocating (model/budget.py)
            plan_network(config)
        c = config
        self.config = c
        self.backbone = Backbone(
            c.in_channels, c.stem_channels, c.encoder_blocks, c.encoder_channels, c.decoder_channels
        )
        self.prior = AxisAlignedConvGaussian(c.in_channels, c.latent_channels, c.latent_convs_per_stage, c.latent_dim,
                                             c.init, c.sigma_bound)  # fmt: skip
        self.posterior = AxisAlignedConvGaussian(c.in_channels + 1, c.latent_channels, c.latent_convs_per_stage,
                                                 c.latent_dim, c.init, c.sigma_bound)  # fmt: skip
        self.fcomb = Fcomb(c.decoder_channels[-1], c.latent_dim, c.fcomb_channels, c.fcomb_layers, c.init)
        self.harmonizer = (
            NoiseHarmonizer(
                c.decoder_channels, c.harmonized_stages, c.harmonizer_tokens, c.harmonizer_dim, c.harmonizer_hidden,
                shared=c.harmonizer_shared,
            )
            if c.use_harmonizer
            else None
        )
        self.personalizer = _personalizer(c) if c.use_personalizer else None
        self.phase = 1
        self.set_phase(1)

    # -----------------------------------------------------------------------------------------------------
    # Phases.

    def _shared(self) -> list[nn.Module]:
        return [m for m in (self.backbone, self.prior, self.posterior, self.fcomb, self.harmonizer) if m is not None]

    def set_phase(self, phase: int) -> HarmonizerNet:
        """Phase 1: train backbone, prior, posterior, fcomb and harmonizer (personalizer frozen and unused).
        Phase 2: freeze all of those (batch-norm statistics included) and train only the personalizer."""
        if phase not in (1, 2):
            raise ValueError(f"set_phase: phase must be 1 or 2, got {phase!r}")
        if phase == 2 and self.personalizer is None:
            raise ValueError("set_phase(2): this model has no personalizer (config.use_personalizer=False)")
        self.phase = phase
        for m in self._shared():
            m.requires_grad_(phase == 1)
        if self.personalizer is not None:
            self.personalizer.requires_grad_(phase == 2)
        return self.train(self.training)

    def train(self, mode: bool = True) -> HarmonizerNet:
        super().train(mode)
        if self.phase == 2:
            for m in self._shared():
                m.eval()  # frozen: keep batch-norm running statistics fixed
        return self

    def _check_images(self, images: object, *, finite: bool = False) -> Tensor:
        images = check_images(self.config, images, finite=finite)
        dtype = self.stem_dtype()
        if images.dtype != dtype and not torch.is_autocast_enabled(images.device.type):
            if not finite:  # training: the caller's data pipeline chose a dtype the weights do not have
                raise TypeError(f"HarmonizerNet: images are {images.dtype}, the model's weights {dtype}; convert the "
                                f"images (images.to({dtype})) or the model (model.to({dtype}))")  # fmt: skip
            images = images.to(dtype)  # inference: float64 / float16 / bfloat16 images in, at the weights' precision
        return images

    def stem_dtype(self) -> torch.dtype:
        """The dtype of the weights the images meet first."""
        return next(self.parameters()).dtype

    def _check_masks(self, masks: object, images: Tensor) -> Tensor:
        return check_masks(self.config, masks, images)

    # -----------------------------------------------------------------------------------------------------
    # Forward passes.

    def features(self, images: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Backbone features ``f`` (B, D, H, W), harmonized when the harmonizer is on, and its (gamma, beta)."""
        record: list[tuple[Tensor, Tensor]] = []
        modulate = None
        if self.harmonizer is not None:
            harmonizer = self.harmonizer

            def modulate(stage: int, x: Tensor) -> Tensor:
                return harmonizer(stage, x, record)

        return self.backbone(images, modulate), record

    def draw_noise(self, batch: int, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """Every random draw of one training forward in the current phase, for ``batch`` images (CPU tensors).

        Drawing them outside the forward lets a trainer take them from a generator seeded per step, so that
        a resumed run, or the same global batch split over several processes, sees the same randomness.
        """
        c = self.config
        d = c.latent_dim
        if self.phase == 1:
            return {
                "rater_index": torch.randint(0, c.num_raters, (batch,), generator=generator),
                "posterior": torch.randn((batch, d), generator=generator),
                "prior": torch.randn((batch, c.ged_samples, d), generator=generator),
            }
        return {
            "z": torch.randn((batch, d), generator=generator),
            "bank": torch.randn((batch, c.prior_bank, d), generator=generator),
        }

    def forward(
        self,
        images: Tensor,
        masks: Tensor,
        *,
        rater_index: Optional[Tensor] = None,
        noise: Optional[dict[str, Tensor]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> ModelOutput:
        """Training forward for the current phase.

        Phase 1 (Eq. 8): the posterior sees rater ``rater_index[b]``'s mask (random when None), its sample goes
        through fcomb (``posterior_logits``), and with the GED loss on, ``config.ged_samples`` prior samples
        give ``prior_logits``. Phase 2 (Eq. 6): a prior sample z and a bank of M_z prior samples go through the
        personalizer to one latent per rater, giving ``personalized_logits`` (B, R, H, W). ``noise`` (from
        :meth:`draw_noise`) fixes every random draw; otherwise they come from ``generator``.
        """
        images = self._check_images(images)
        masks = self._check_masks(masks, images)
        b = images.shape[0]
        c = self.config
        self._check_config_sizes(images, c.ged_samples if self.phase == 1 else c.num_raters, "forward")
        if noise is None:
            noise = self.draw_noise(b, generator)
        noise = {k: v.to(images.device) for k, v in noise.items()}
        if self.phase == 1:
            f, harm = self.features(images)
            prior = self.prior(images)
            if rater_index is None:
                rater_index = noise["rater_index"]
            rater_index = _check_rater_index(rater_index, b, c.num_raters).to(images.device)
            chosen = masks[torch.arange(b, device=images.device), rater_index]
            posterior = self.posterior(with_masks(images, chosen))
            z_post = reparameterize(posterior, noise["posterior"])
            out = ModelOutput(1, f, harm, prior, posterior, rater_index)
            out.posterior_logits = self.fcomb.logits(f, z_post[:, None])[:, 0]
            if c.use_ged_loss:  # which prior parameters the GED term trains: config.ged_through_prior
                through = c.ged_through_prior
                z_prior = reparameterize(prior, noise["prior"], fixed_mean=through == "none",
                                         fixed_sigma=through != "full")  # fmt: skip
                out.prior_logits = self.fcomb.logits(f, z_prior)
            return out
        with torch.no_grad():  # everything but the personalizer is frozen in phase 2
            f, harm = self.features(images)
            prior = self.prior(images)
            z, bank = reparameterize(prior, noise["z"]), reparameterize(prior, noise["bank"])
        raters = torch.arange(c.num_raters, device=images.device)
        z_personal = self.personalizer(f, z, bank, raters)
        out = ModelOutput(2, f, harm, prior)
        out.personalized_logits = self.fcomb.logits(f, z_personal)
        return out

    def _check_config_sizes(self, images: Tensor, maps: int, where: str) -> None:
        """Refuse before drawing when the config's forward-time counts, which the build does not hold
        (``ged_samples`` or the rater heads' fcomb maps, and the ``prior_bank`` with its attention keys and
        values), need more memory than is available (model/budget.py bounds the build itself)."""
        c = self.config
        b, _, h, w = images.shape
        nbytes = 4 * b * (maps * c.fcomb_channels * h * w + c.prior_bank * (c.latent_dim + 2 * c.personalizer_attn_dim))
        check_fits(nbytes, f"{where}: the config's ged_samples={c.ged_samples}, num_raters={c.num_raters} and "
                           f"prior_bank={c.prior_bank} for {b} image(s) of {h} x {w}")  # fmt: skip

    # -----------------------------------------------------------------------------------------------------
    # Inference: one backbone pass per image, K samples for the price of the fused head.

    @property
    def personalizer_trained(self) -> bool:
        """Whether phase 2 has trained the personalizer (at least one optimizer step)."""
        return self.personalizer is not None and int(self.personalizer.trained_steps) > 0

    def _raters(self, raters: Optional[Union[int, list[int], Tensor]], op: str) -> Tensor:
        r = self.config.num_raters
        idx = torch.arange(r) if raters is None else torch.as_tensor(raters, dtype=torch.long).reshape(-1)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= r:
            raise ValueError(f"{op}: raters must be indices in [0, {r}), got {idx.tolist()}")
        return idx

    def _rater_indices(self, raters: Optional[Union[int, list[int], Tensor]], allow_untrained: bool) -> Tensor:
        if self.personalizer is None:
            raise ValueError("personalize: this model has no personalizer (config.use_personalizer=False)")
        if not allow_untrained and not self.personalizer_trained:
            raise ValueError("personalize: this model's personalizer was never trained (phase 2 did not run); "
                             "train phase 2, or pass allow_untrained=True for the untrained heads")  # fmt: skip
        return self._raters(raters, "personalize")

    def _draws(self, images: Tensor, count: int, generator) -> Tensor:
        return torch.randn((images.shape[0], count, self.config.latent_dim), generator=generator)

    def decode_draws(
        self,
        images: Tensor,
        sample_noise: Tensor,
        bank_noise: Optional[Tensor] = None,
        *,
        heads: Union[bool, str] = False,
        raters: Optional[Tensor] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """What :meth:`predict` computes once its standard-normal draws are made: ``sample_noise (B, K,
        latent)`` for the K prior samples, ``bank_noise (B, M_z, latent)`` for the personalizer's bank of prior
        samples (personalized heads only), ``raters`` the head indices (default: all). No input checks and no
        data-dependent branch: the traceable core that ``torch.export`` captures (:mod:`harmonizer_fast.export`);
        call :meth:`predict` for checked inputs."""
        kind = _heads_kind(heads)
        f, _ = self.features(images)
        prior = self.prior(images)
        probs = self.fcomb.probabilities(f, reparameterize(prior, sample_noise))
        if kind == "none":
            return probs, None
        idx = torch.arange(self.config.num_raters) if raters is None else raters
        if kind == "identity":  # every head is the prior mean's map
            return probs, self.fcomb.probabilities(f, prior.mean[:, None].expand(-1, idx.numel(), -1))
        if bank_noise is None:
            raise ValueError("decode_draws: personalized heads need bank_noise (B, M_z, latent)")
        return probs, self._heads(f, prior, bank_noise, idx)

    def _heads(self, f: Tensor, prior: Independent, bank_noise: Tensor, idx: Tensor) -> Tensor:
        bank = reparameterize(prior, bank_noise)  # M_z prior samples
        return self.fcomb.probabilities(f, self.personalizer(f, prior.mean, bank, idx.to(f.device)))

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        num_samples: int = 16,
        *,
        heads: Union[bool, str] = True,
        raters: Optional[Union[int, list[int], Tensor]] = None,
        generator=None,
        bank_generator=None,
        allow_untrained: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``num_samples`` prior samples ``(B, K, H, W)`` and one map per rater ``(B, R', H, W)``, from one
        backbone and prior pass (what :meth:`sample` and :meth:`personalize` would compute in two).

        ``heads``: True or ``"personalized"``: the personalized heads of :meth:`personalize`; ``"identity"``:
        every rater gets the prior mean's prediction (z'_i = z, the heads of a model without a
        personalizer); False or ``"none"``: no heads (None). The K sample latents are drawn first, then the
        bank, so the results equal :meth:`sample` followed by :meth:`personalize` on one generator;
        ``bank_generator`` draws the bank from its own stream instead (so the samples do not depend on
        whether heads are computed)."""
        kind = _heads_kind(heads)
        images = self._check_images(images, finite=True)
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"sample: num_samples must be a positive int, got {num_samples!r}")
        b, _, h, w = images.shape
        # the K maps and one temporary of their size exist at once: refuse before allocating them
        check_fits(2 * 4 * b * num_samples * h * w, f"predict: num_samples={num_samples} for {b} image(s) of {h} x {w}")
        if kind == "personalized":
            idx = self._rater_indices(raters, allow_untrained)
            self._check_config_sizes(images, len(idx), "predict")
        else:
            idx = self._raters(raters, "predict") if kind == "identity" else None
        noise = self._draws(images, num_samples, generator)  # the samples' draws first, then the bank's
        bank = None
        if kind == "personalized":
            bank = self._draws(images, self.config.prior_bank, bank_generator or generator)
        return self.decode_draws(images, noise, bank, heads=kind, raters=idx)

    @torch.no_grad()
    def sample(self, images: Tensor, num_samples: int = 16, *, generator=None, z: Optional[Tensor] = None) -> Tensor:
        """``num_samples`` segmentation probabilities per image from the prior: ``(B, K, H, W)``.

        One backbone pass per image; the K samples cost only the split fcomb head (see :mod:`.fcomb`). ``z``
        ``(B, K, latent)`` replaces the prior draws (for reproducing or comparing paths).
        """
        if z is None:
            return self.predict(images, num_samples, heads=False, generator=generator)[0]
        f, _ = self.features(self._check_images(images, finite=True))
        return self.fcomb.probabilities(f, z)

    @torch.no_grad()
    def personalize(
        self,
        images: Tensor,
        raters: Optional[Union[int, list[int], Tensor]] = None,
        *,
        generator=None,
        allow_untrained: bool = False,
    ) -> Tensor:
        """One probability map per rater head, ``(B, R', H, W)``: rater i's personalized latent from the prior
        mean and a bank of ``config.prior_bank`` prior samples, through the shared head. ``raters`` picks
        heads (default: all ``num_raters``). A personalizer that phase 2 never trained raises, since its heads
        are not personalized; ``allow_untrained=True`` returns them anyway (e.g. as a comparison)."""
        idx = self._rater_indices(raters, allow_untrained)
        images = self._check_images(images, finite=True)
        f, _ = self.features(images)
        return self._heads(f, self.prior(images), self._draws(images, self.config.prior_bank, generator), idx)
