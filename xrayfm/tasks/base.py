"""What a head task is: targets, loss, prediction and metrics, plus the task registry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from xrayfm.tasks.data import LabeledImage

_TASKS: dict[str, type[HeadTask]] = {}


class HeadTask:
    """One task. Items given to ``targets``/``loss`` are at the training size; ``predict`` maps
    head outputs back to each original item's pixel frame."""

    name: str = ""
    default_head: str = ""
    input_kind: str = "dense"
    default_out_stride: int = 4       # dense heads: output stride and whether they read the image,
    default_image_skip: bool = False  # when the training config leaves them at None

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes
        self.threshold: float | None = None  # decision threshold (operating point); None: the task has none

    @property
    def head_task(self) -> str:
        """Task the registered heads of this task are filed under (``name`` unless it shares heads)."""
        return self.name

    def has_label(self, item: LabeledImage) -> bool:
        raise NotImplementedError

    def head_kwargs(self) -> dict[str, Any]:
        return {}

    def bind_head(self, head: nn.Module) -> None:
        """Take what the targets depend on from the ``head`` about to be trained (default: nothing)."""

    def run_head(self, head: nn.Module, feats: Tensor | list[Tensor], size: tuple[int, int]) -> Tensor:
        return head(feats)

    def finish_head(self, head: nn.Module, items: Sequence[LabeledImage]) -> None:
        """Adjust the trained ``head`` given the labelled items it was trained on (default: nothing)."""

    def targets(self, items: Sequence[LabeledImage]) -> dict[str, Tensor]:
        raise NotImplementedError

    def loss(self, out: Tensor, targets: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def predict(self, out: Tensor, originals: Sequence[LabeledImage], size: tuple[int, int]) -> list[Any]:
        raise NotImplementedError

    def metrics(self, preds: list[Any], items: Sequence[LabeledImage]) -> dict[str, Any]:
        raise NotImplementedError

    def predict_soft(self, out: Tensor, originals: Sequence[LabeledImage], size: tuple[int, int]) -> list[Any]:
        """Predictions before the decision threshold (default: :meth:`predict`)."""
        return self.predict(out, originals, size)

    def decide(self, soft: list[Any]) -> list[Any]:
        """:meth:`predict_soft` output at ``self.threshold`` -> what :meth:`predict` returns."""
        return soft

    def tune_threshold(self, soft: list[Any], items: Sequence[LabeledImage]) -> dict[str, Any] | None:
        """The operating point that maximises this task's criterion on labelled ``items`` (the val
        split), from :meth:`predict_soft` output; None when the task has no threshold."""
        return None

    def apply_operating_point(self, op: dict[str, Any]) -> None:
        """Decide at ``op`` (a :meth:`tune_threshold` result or a head card's ``operating_point``)."""
        if self.threshold is not None:
            self.threshold = float(op["threshold"])

    def operating_point(self) -> dict[str, float]:
        """What :meth:`decide` runs at (``threshold``, plus task-specific keys); empty without one."""
        return {} if self.threshold is None else {"threshold": self.threshold}


def register_task(cls: type[HeadTask]) -> type[HeadTask]:
    """Class decorator adding a task to the registry under ``cls.name``."""
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str, num_classes: int | None = None) -> HeadTask:
    """Instantiate a registered task."""
    import xrayfm.tasks.classify
    import xrayfm.tasks.detect
    import xrayfm.tasks.segment  # noqa: F401

    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(_TASKS)}")
    return _TASKS[name](num_classes=num_classes)
