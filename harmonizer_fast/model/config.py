"""HarmonizerNet configuration (docs/architecture.md, "Model", paper section 3 and appendices A and K)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .._schema import check_field_types
from .latent import SIGMA_BOUNDS


@dataclass(frozen=True)
class HarmonizerConfig:
    """Every size and switch of the network; ``paper()`` and ``small()`` are the two presets.

    The plain probabilistic U-Net baseline is the same network with ``use_harmonizer``,
    ``use_personalizer`` and ``use_ged_loss`` all False.
    """

    # Which preset this config derives from ("paper", "small"): the training recipe (learning rates) follows it.
    preset: str = "paper"
    in_channels: int = 1
    num_raters: int = 4
    # Backbone: ResNet encoder (BasicBlocks per stage, stem and stage widths) and U-Net decoder widths.
    stem_channels: int = 64
    encoder_blocks: tuple[int, ...] = (3, 4, 6, 3)
    encoder_channels: tuple[int, ...] = (64, 128, 256, 512)
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    # Prior and posterior nets: channels per stage, 3x3 convs per stage, latent size.
    latent_channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    latent_convs_per_stage: int = 3
    latent_dim: int = 6
    # Sampling head "fcomb": 1x1 convs (features + z) -> fcomb_channels (x fcomb_layers) -> 1.
    fcomb_channels: int = 16
    fcomb_layers: int = 3
    # Noise Harmonizer (3.1): M artifact tokens of size Dh, MLP width, which decoder stages it modulates
    # (indices into decoder_channels).
    use_harmonizer: bool = True
    # The paper shares the tokens and the MLP's first layer across decoder layers (a cross-scale regularizer,
    # section 3.1); False gives every harmonized stage its own (the supplement's sharing ablation).
    harmonizer_shared: bool = True
    harmonizer_tokens: int = 8
    harmonizer_dim: int = 32
    harmonizer_hidden: int = 96
    harmonized_stages: tuple[int, ...] = (0, 1, 2, 3, 4)
    # Personalizer (3.2): prompt components, their stored size, prior-bank size M_z, attention width.
    use_personalizer: bool = True
    # Which phase-2 personalizer: "frequency" (the paper's frequency-prompt Personalizer, section 3.2) or
    # "dpersona" (D-Persona's projection heads, the paper's strongest baseline; model/dpersona.py).
    personalizer: str = "frequency"
    prompt_components: int = 5
    prompt_size: int = 32
    prior_bank: int = 100
    personalizer_attn_dim: int = 32
    personalizer_hidden: int = 32
    # Losses (appendix A).
    use_ged_loss: bool = True
    ged_samples: int = 4
    # Which prior parameters the GED term of Eq. 8 trains through its reparameterized samples: "none" (the
    # default: the samples are drawn from the prior with its mean and sigma held fixed, so the prior is fitted
    # by the KL term alone, as in the probabilistic U-Net, and the GED term trains the encoder, harmonizer and
    # fcomb), "mean" (the mean only) or "full". With "full" the GED term's diversity reward, -E d(S, S'),
    # widens sigma until it meets its clamp, and at sigma = e^2 the KL gradient on the prior mean is 1/55 of
    # its size at sigma = 1, so the mean never leaves its image-independent start (measured on LIDC:
    # benchmarks/results/lidc-prior-collapse-small-cpu.md).
    ged_through_prior: str = "none"
    # Initialization of the layers without batch norm, the prior and posterior nets and fcomb: "he" (the
    # probabilistic U-Net's He initialization) or "torch" (torch's defaults, used before). Torch's default
    # scales a signal by about 1/sqrt(3) per conv + ReLU, so an untrained prior does not see the image
    # (model/latent.py) and fcomb's four layers pass 1/36 of the features' variation to the logits: on a small
    # dataset the first ~30 optimizer steps were flat, every prediction empty (losses.py, tests/test_train.py).
    init: str = "he"
    # How the prior and posterior nets keep sigma within [e^-5, e^2]: "soft" (a scaled sigmoid, a gradient
    # everywhere) or "hard" (a clamp, used before: a raw log-sigma past e^2 had no gradient and stayed there,
    # model/latent.py bound_log_sigma).
    sigma_bound: str = "soft"
    lambda_kl: float = 2e-3
    lambda_harm: float = 3e-4
    lambda_ged: float = 1.0

    def __post_init__(self) -> None:
        _check(self)

    @classmethod
    def paper(cls, in_channels: int = 1, num_raters: int = 4, **overrides: Any) -> HarmonizerConfig:
        """The paper's size: ResNet-34 U-Net, about 30 M parameters, 2.4 G MACs at 128 x 128."""
        return cls(in_channels=in_channels, num_raters=num_raters, **overrides)

    @classmethod
    def small(cls, in_channels: int = 1, num_raters: int = 4, **overrides: Any) -> HarmonizerConfig:
        """The same structure, narrow enough to train usefully in minutes on 2 CPU cores."""
        base = dict(
            preset="small",
            stem_channels=16,
            encoder_blocks=(1, 1, 1, 1),
            encoder_channels=(16, 24, 32, 48),
            decoder_channels=(48, 32, 24, 16, 16),
            latent_channels=(8, 16, 24, 32, 32),
            latent_convs_per_stage=2,
            fcomb_channels=16,
            harmonizer_tokens=4,
            harmonizer_dim=16,
            harmonizer_hidden=32,
            prompt_components=4,
            prompt_size=8,
            prior_bank=16,
            personalizer_attn_dim=16,
            personalizer_hidden=16,
        )
        base.update(overrides)
        return cls(in_channels=in_channels, num_raters=num_raters, **base)

    def baseline(self) -> HarmonizerConfig:
        """This config as the plain probabilistic U-Net: harmonizer, personalizer and GED loss off."""
        return replace(self, use_harmonizer=False, use_personalizer=False, use_ged_loss=False)

    @property
    def downsamplings(self) -> int:
        """Input sizes must be multiples of 2 ** downsamplings."""
        return len(self.decoder_channels)

    @property
    def size_multiple(self) -> int:
        """Image sizes the network takes are multiples of this (the data is zero-padded up to it)."""
        return 2**self.downsamplings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HarmonizerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"HarmonizerConfig: unknown keys {sorted(unknown)}")
        tuples = {f.name for f in fields(cls) if str(f.type).startswith("tuple")}
        # a config saved before these options existed trained the prior through the GED term, from torch's init
        d = {"ged_through_prior": "full", "init": "torch", "sigma_bound": "hard", **d}
        # JSON has lists where the config has tuples; anything else goes to the field check, which names the field
        return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in d.items()})


PRESETS = ("paper", "small")
PERSONALIZERS = ("frequency", "dpersona")
# The fields only the personalizer reads (section 3.2; phase 2): a phase-1 model trained with other values, or
# with no personalizer, starts a phase 2 of these values (checkpoint.load_training_state, fresh_personalizer).
PERSONALIZER_FIELDS = ("use_personalizer", "personalizer", "prompt_components", "prompt_size", "prior_bank",
                       "personalizer_attn_dim", "personalizer_hidden")  # fmt: skip
GED_THROUGH_PRIOR = ("none", "mean", "full")
INITS = ("he", "torch")


def _check(c: HarmonizerConfig) -> None:
    check_field_types(c)
    for name in ("lambda_kl", "lambda_harm", "lambda_ged"):
        if getattr(c, name) < 0:
            raise ValueError(f"HarmonizerConfig.{name}: expected a finite number >= 0, got {getattr(c, name)}")

    def positive(name: str) -> None:
        if getattr(c, name) < 1:
            raise ValueError(f"HarmonizerConfig: {name} must be >= 1, got {getattr(c, name)}")

    # every count and width is >= 1 (the stage indices of harmonized_stages are checked below)
    for f in fields(c):
        if str(f.type) == "int":
            positive(f.name)
        elif str(f.type) == "tuple[int, ...]" and f.name != "harmonized_stages" and min(getattr(c, f.name),
                                                                                         default=0) < 1:
            raise ValueError(f"HarmonizerConfig: {f.name} must hold integers >= 1, got {getattr(c, f.name)}")
    if len(c.encoder_blocks) != len(c.encoder_channels) or len(c.encoder_channels) != 4:
        raise ValueError("HarmonizerConfig: encoder_blocks and encoder_channels need 4 stages each")
    if len(c.decoder_channels) != 5:
        raise ValueError("HarmonizerConfig: decoder_channels needs 5 stages (stem, /4, /8, /16, /32 skips)")
    if any(not 0 <= s < len(c.decoder_channels) for s in c.harmonized_stages):
        raise ValueError(f"HarmonizerConfig: harmonized_stages must index decoder_channels, got {c.harmonized_stages}")
    if c.preset not in PRESETS:
        raise ValueError(f"HarmonizerConfig: preset must be one of {PRESETS}, got {c.preset!r}")
    if c.personalizer not in PERSONALIZERS:
        raise ValueError(f"HarmonizerConfig: personalizer must be one of {PERSONALIZERS}, got {c.personalizer!r}")
    if c.ged_through_prior not in GED_THROUGH_PRIOR:
        raise ValueError(f"HarmonizerConfig: ged_through_prior must be one of {GED_THROUGH_PRIOR}, "
                         f"got {c.ged_through_prior!r}")  # fmt: skip
    if c.sigma_bound not in SIGMA_BOUNDS:
        raise ValueError(f"HarmonizerConfig: sigma_bound must be one of {SIGMA_BOUNDS}, got {c.sigma_bound!r}")
    if c.init not in INITS:
        raise ValueError(f"HarmonizerConfig: init must be one of {INITS}, got {c.init!r}")
    if c.use_personalizer and c.personalizer == "frequency" and c.decoder_channels[-1] % 4:
        raise ValueError(f"HarmonizerConfig: decoder_channels[-1] must be a multiple of 4 with the frequency "
                         f"personalizer (it reduces that width by 4), got {c.decoder_channels[-1]}")  # fmt: skip
