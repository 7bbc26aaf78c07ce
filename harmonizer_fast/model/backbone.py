"""The probabilistic U-Net's deterministic backbone (paper section 3, appendix K; docs/architecture.md, "Model"): a
ResNet encoder (BasicBlocks, ResNet-34 in the paper config) and a U-Net decoder whose last stage gives the
16-channel full-resolution features ``f`` that the sampling head and the personalizer read.

The decoder calls an optional ``modulate(stage, features)`` hook after each stage: that is where the Noise
Harmonizer applies its FiLM (paper Eq. 3) without the backbone knowing about it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cpu_paths import eager_cpu


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)), inplace=True)


def stem_max_pool(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 3, 2, 1)``, the stem's pool. Without autograd it is computed as two 1-D max pools
    over strided slices (the max is separable and exact, NaN propagates as in the pool): ATen's NCHW pool
    also computes the argmax indices, which inference never needs, and took 16.6 ms against 3.8 ms for the
    paper config's (16, 64, 64, 64) stem output on 2 Zen 4 cores. With autograd the pool itself runs: the
    slices' gradient would split ties (frequent after a ReLU) where the pool routes it to one argmax; under
    torch.compile and torch.export too, so that their graphs (ONNX included) hold the one standard op; and on
    a GPU, where it was not measured."""
    if not eager_cpu(x) or (torch.is_grad_enabled() and x.requires_grad):
        return F.max_pool2d(x, 3, 2, 1)
    xp = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    w = torch.maximum(torch.maximum(xp[..., :-2:2], xp[..., 1:-1:2]), xp[..., 2::2])
    return torch.maximum(torch.maximum(w[..., :-2:2, :], w[..., 1:-1:2, :]), w[..., 2::2, :])


class ResNetEncoder(nn.Module):
    """torchvision's ResNet layout (conv1/bn1/layer1..4 names, so a ResNet-34 state dict loads) returning the
    five feature maps at strides 2, 4, 8, 16 and 32."""

    def __init__(self, in_channels: int, stem: int, blocks: Sequence[int], channels: Sequence[int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        layers, cin = [], stem
        for i, (n, cout) in enumerate(zip(blocks, channels)):
            stride = 1 if i == 0 else 2
            layer = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(n - 1)]
            layers.append(nn.Sequential(*layer))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_channels = (stem, *channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        f0 = F.relu(self.bn1(self.conv1(x)), inplace=True)
        f1 = self.layer1(stem_max_pool(f0))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f0, f1, f2, f3, self.layer4(f3)]


class DecoderBlock(nn.Module):
    """Upsample x2 (nearest), concatenate the skip, two 3x3 conv + BN + ReLU."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin + skip, cout)
        self.conv2 = conv_bn_relu(cout, cout)

    def forward(self, x: Tensor, skip: Optional[Tensor]) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """Five decoder stages from stride 32 back to full resolution; the last has no skip."""

    def __init__(self, encoder_channels: Sequence[int], channels: Sequence[int]) -> None:
        super().__init__()
        skips = [*reversed(encoder_channels[:-1]), 0]  # 256, 128, 64, stem, none (ResNet-34)
        cins = [encoder_channels[-1], *channels[:-1]]
        self.blocks = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(cins, skips, channels))
        self.out_channels = tuple(channels)

    def forward(self, feats: list[Tensor], modulate: Optional[Callable[[int, Tensor], Tensor]] = None) -> Tensor:
        skips = [*reversed(feats[:-1]), None]
        x = feats[-1]
        for stage, (block, skip) in enumerate(zip(self.blocks, skips)):
            x = block(x, skip)
            if modulate is not None:
                x = modulate(stage, x)
        return x


class Backbone(nn.Module):
    """Encoder plus decoder: image ``(B, C, H, W)`` -> features ``(B, decoder_channels[-1], H, W)``."""

    def __init__(self, in_channels: int, stem: int, blocks, enc_channels, dec_channels) -> None:
        super().__init__()
        self.encoder = ResNetEncoder(in_channels, stem, blocks, enc_channels)
        self.decoder = UNetDecoder(self.encoder.out_channels, dec_channels)

    def forward(self, x: Tensor, modulate: Optional[Callable[[int, Tensor], Tensor]] = None) -> Tensor:
        return self.decoder(self.encoder(x), modulate)

    def load_resnet_state_dict(self, state: dict[str, Tensor]) -> list[str]:
        """Load a torchvision-layout ResNet state dict (e.g. ResNet-34 weights saved to a file) into the encoder.

        The classifier (``fc.*``) is ignored; a first conv with 3 input channels is averaged to this
        encoder's input channels. Returns the encoder keys left at their initial values.
        """
        own = self.encoder.state_dict()
        picked = {}
        for k, v in state.items():
            if k.startswith("fc.") or k not in own:
                continue
            if k == "conv1.weight" and v.shape[1] != own[k].shape[1]:
                v = v.mean(1, keepdim=True).expand_as(own[k]).contiguous()
            if v.shape != own[k].shape:
                raise ValueError(
                    f"load_resnet_state_dict: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
                )
            picked[k] = v
        self.encoder.load_state_dict(picked, strict=False)
        return sorted(set(own) - set(picked))
