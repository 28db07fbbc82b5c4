"""What encoders whose blocks a task cannot adapt share (a MobileNet, a multiscale transformer):
a task on them is a linear probe on the pooled embedding, so the trunk a task reads runs every
block and its branch only what follows them (a MobileNet's expansion, pooling and projection;
nothing for a multiscale transformer, which runs whole). The names are `Encoder`'s, which adapted
tasks use (`edgetag.model`); `train.refit` splits a MobileNet between any two blocks the same way."""

from __future__ import annotations

import torch
from torch import nn


class PooledEncoder(nn.Module):
    config: object  # the EncoderConfig
    split_layers = 0  # top layers forward_trunk / forward_from can split off (none: it runs whole)

    def check(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] < self.config.patch_time:
            raise ValueError(f"need at least {self.config.patch_time} frames, got {features.shape[1]}")
        return features

    def forward_tasks(self, features: torch.Tensor, branches: dict, trunk: bool = True) -> tuple[torch.Tensor, dict]:
        assert not branches, f"{self.config.encoder} blocks cannot be adapted (ModelSpec refuses adapter tasks on them)"
        return self(features), {}

    def forward_trunk(self, features: torch.Tensor, stop: int) -> torch.Tensor:
        assert stop == self.config.depth, f"{self.config.encoder} blocks cannot be adapted"
        return self(features)

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        assert start == self.config.depth, f"{self.config.encoder} blocks cannot be split"
        return x

    def forward_branch(self, x: torch.Tensor, branch) -> torch.Tensor:
        return self.forward_from(x, branch.first)
