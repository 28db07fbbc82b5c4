"""What encoders whose blocks a task cannot adapt share (a MobileNet, a multiscale transformer):
a task on them is a linear probe on the pooled embedding, so the trunk a task reads is the whole
encoder and a task's branch adds nothing to it. The names are `Encoder`'s, which adapted tasks
use (`edgetag.model`)."""

from __future__ import annotations

import torch
from torch import nn


class PooledEncoder(nn.Module):
    config: object  # the EncoderConfig

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

    def forward_branch(self, x: torch.Tensor, branch) -> torch.Tensor:
        return x
