"""SSL method registry: a method = view transform + student/teacher networks + loss + momentum update.

The trainer only talks to :class:`SSLMethod`; adding a method (e.g. ``anatomy``) is one class
and one :func:`register_method` call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from xrayfm.models.backbones import Backbone
    from xrayfm.ssl.config import PretrainConfig


@dataclass(frozen=True)
class Progress:
    """Where training stands; schedules are functions of it."""

    step: int              # global optimiser step (0-based) about to be taken
    epoch: int
    steps_per_epoch: int
    total_steps: int

    @property
    def epoch_float(self) -> float:
        return self.step / self.steps_per_epoch


class SSLMethod(nn.Module, ABC):
    """Interface every SSL method implements. ``student`` is what the optimiser trains."""

    name: str = ""
    student: nn.Module

    @abstractmethod
    def make_transform(self) -> Callable[[Tensor, torch.Generator], dict[str, Tensor]]:
        """Views of one ``(1, H, W)`` image for one training sample."""

    @abstractmethod
    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Batch the views of several samples."""

    @abstractmethod
    def loss(self, student: nn.Module, batch: dict[str, Tensor],
             progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one batch; ``student`` is ``self.student`` or its DDP wrapper.

        Returns the loss and detached scalar statistics (logged as they are).
        """

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch's views are made (views may depend on the epoch)."""

    def after_backward(self, progress: Progress) -> None:
        """Hook between backward and the optimiser step (e.g. freeze some gradients)."""

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """Momentum (EMA) update of the teacher, if the method has one."""

    def collapse_warning(self, stats: dict[str, float]) -> str | None:
        """A one-line warning when the statistics show representation collapse."""
        return None

    @abstractmethod
    def trained_backbone(self) -> Backbone:
        """The backbone to export when training ends."""


MethodFactory = Callable[["PretrainConfig"], SSLMethod]
_METHODS: dict[str, MethodFactory] = {}


def register_method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator registering ``factory(cfg) -> SSLMethod`` under ``name``."""

    def deco(factory: MethodFactory) -> MethodFactory:
        _METHODS[name] = factory
        return factory

    return deco


def list_methods() -> list[str]:
    return sorted(_METHODS)


def build_method(cfg: PretrainConfig) -> SSLMethod:
    """Instantiate the method named by ``cfg.method``."""
    from xrayfm.config import ConfigError

    if cfg.method not in _METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; choose one of {', '.join(list_methods())}")
    return _METHODS[cfg.method](cfg)
