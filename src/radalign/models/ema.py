"""Exponential-moving-average copies of sub-modules: the momentum teachers of MLIP and UniMedI."""

from __future__ import annotations

import copy

import torch
from torch import nn

from radalign.errors import ConfigError


class EMACopies(nn.Module):
    """Frozen EMA copies of named sub-modules of ``model``, updated with ``update()`` after each optimiser step.

    The copies are registered buffers-and-parameters of this module, so they are saved in checkpoints (exact
    resume) and moved with the model between devices, but they never receive gradients.
    """

    def __init__(self, model: nn.Module, names: list[str], decay: float) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"ema.decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = list(names)
        self.copies = nn.ModuleDict()
        for name in self.names:
            source = self._source(model, name)
            clone = copy.deepcopy(source)
            clone.requires_grad_(False)
            clone.eval()
            self.copies[name.replace(".", "__")] = clone

    @staticmethod
    def _source(model: nn.Module, name: str) -> nn.Module:
        try:
            return model.get_submodule(name)
        except AttributeError as err:
            known = sorted(n for n, _ in model.named_children())
            raise ConfigError(f"ema.modules: the model has no sub-module {name!r}; top-level ones: {known}") from err

    def __getitem__(self, name: str) -> nn.Module:
        return self.copies[name.replace(".", "__")]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name in self.names:
            source = self._source(model, name)
            target = self[name]
            for ema_p, p in zip(target.parameters(), source.parameters(), strict=True):
                ema_p.lerp_(p.detach(), 1.0 - self.decay)
            for ema_b, b in zip(target.buffers(), source.buffers(), strict=True):
                ema_b.copy_(b)

    def train(self, mode: bool = True) -> EMACopies:
        super().train(mode)
        for clone in self.copies.values():
            clone.eval()  # teachers always run in inference mode (no dropout, frozen batch-norm statistics)
        return self
