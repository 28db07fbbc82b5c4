"""EfficientAT's MobileNetV3 (Schmid et al., ICASSP 2023) as an edgetag encoder (`encoder="mobilenet"`).

A convolutional encoder over the log-mel image: a stride-2 stem, MobileNetV3-Large's fifteen
inverted-residual blocks (depthwise convolutions, squeeze-excitation, hard-swish), a 1x1
expansion, global average pooling and EfficientAT's "mlp" projection. Module names are those of
EfficientAT's checkpoints (`features.*`), so `train.convert --from efficientat` loads mn04's
AudioSet weights as they are; its classifier's last layer becomes the tag head.

The encoder reads the whole window at once (32x fewer rows each way after its strides), so it
has no tokens to mask, drop or adapt: pretraining objectives and adapter tasks are refused for
it, linear tasks on its embedding work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgetag.pooled import PooledEncoder
from edgetag.spec import EncoderConfig, divisible

# MobileNetV3-Large: input channels, kernel, expanded channels, output channels, SE, hard-swish, stride
MOBILENET_V3 = (
    (16, 3, 16, 16, False, False, 1), (16, 3, 64, 24, False, False, 2), (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2), (40, 5, 120, 40, True, False, 1), (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2), (80, 3, 200, 80, False, True, 1), (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1), (80, 3, 480, 112, True, True, 1), (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2), (160, 5, 960, 160, True, True, 1), (160, 5, 960, 160, True, True, 1),
)


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: type | None = None) -> nn.Sequential:
    """torchvision's ConvNormActivation as EfficientAT's checkpoints name it: conv (no bias), BN, activation."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=0.001, momentum=0.01)]
    return nn.Sequential(*layers, *([act()] if act else []))


class ChannelSE(nn.Module):
    """Squeeze-excitation over channels. EfficientAT keeps it in a list of concurrent SE layers;
    with se_dims="c" (mn04's) the list holds this one, so their max-aggregation is the identity."""

    def __init__(self, channels: int):
        super().__init__()
        squeeze = divisible(channels // 4)
        self.conc_se_layers = nn.ModuleList([nn.ModuleDict({"fc1": nn.Linear(channels, squeeze), "fc2": nn.Linear(squeeze, channels)})])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        se = self.conc_se_layers[0]
        scale = se["fc2"](F.relu(se["fc1"](x.mean((2, 3)))))  # [B, C]
        return x * torch.sigmoid(scale)[:, :, None, None]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, act: type, stride: int):
        super().__init__()
        layers = [] if expanded == cin else [conv_bn(cin, expanded, act=act)]
        layers += [conv_bn(expanded, expanded, kernel, stride, groups=expanded, act=act), *([ChannelSE(expanded)] if se else []), conv_bn(expanded, cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.residual else y


def mobilenet_features(width_mult: float) -> tuple[nn.Sequential, int]:
    """The convolutional trunk at `width_mult` ([B, 1, F, T] -> [B, C, F/32, T/32]) and its C."""
    w = lambda c: divisible(c * width_mult)  # noqa: E731
    blocks = [InvertedResidual(w(a), k, w(e), w(b), se, nn.Hardswish if hs else nn.ReLU, s) for a, k, e, b, se, hs, s in MOBILENET_V3]
    last = w(MOBILENET_V3[-1][3])
    return nn.Sequential(conv_bn(1, w(16), 3, 2, act=nn.Hardswish), *blocks, conv_bn(last, 6 * last, act=nn.Hardswish)), 6 * last


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """Fold every conv_bn's batch norm into its convolution, in place (eval-mode arithmetic: the
    same outputs within float rounding, one op fewer per layer)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.modules():
        if isinstance(child, nn.Sequential) and len(child) > 1 and isinstance(child[0], nn.Conv2d) and isinstance(child[1], nn.BatchNorm2d):
            child[0], child[1] = fuse_conv_bn_eval(child[0], child[1]), nn.Identity()
    return module


class MobileNetEncoder(PooledEncoder):
    """Features [B, T, n_mels] -> one embedding "token" [B, 1, width]: the trunk, global average
    pooling, then EfficientAT's projection (linear, hard-swish, dropout) to `width`."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.features, channels = mobilenet_features(config.width_mult)
        self.project = nn.Sequential(nn.Linear(channels, config.width), nn.Hardswish(), nn.Dropout(0.2))

    @property
    def split_layers(self) -> int:
        return self.config.depth

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.forward_from(self.forward_trunk(features, 0), 0)

    def forward_trunk(self, features: torch.Tensor, stop: int) -> torch.Tensor:
        """What enters inverted-residual block `stop` (the stem's output at 0, the last block's at depth)."""
        return self.features[: 1 + stop](self.check(features).transpose(1, 2)[:, None])  # [B, 1, F, T] -> [B, C, F', T']

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The embedding "token" [B, 1, width] from what enters block `start`."""
        x = self.features[1 + start :](x)  # [B, C, F/32, T/32]
        return self.project(x.mean((2, 3)))[:, None]
