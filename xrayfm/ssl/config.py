"""The pretraining config: one typed dataclass, loadable from YAML (``xrayfm.config.load_yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from xrayfm.config import ConfigError
from xrayfm.models.backbones import INPUT_NORMS
from xrayfm.ssl.anatomy_views import AnatomyConfig
from xrayfm.ssl.multicrop import AugmentConfig


@dataclass
class PretrainConfig:
    """Defaults suit a few thousand images on one machine; docs/pretrain.md has the reference recipe."""

    # data
    lake: str | None = None
    split: str | None = "train"
    where: str | None = None
    # model
    arch: str = "vit_small_patch16"
    method: str = "dino"
    init: str | None = None          # local timm / DINO / HF weights to start from
    drop_path_rate: float = 0.1
    freeze_patch_embed: bool = False  # ViT only: keep the random patch projection (MoCo v3's stabiliser)
    input_norm: str = "fixed"        # fixed (PIXEL_MEAN / PIXEL_STD) | equalize (per-image histogram)
    # head and loss
    out_dim: int = 4096
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    head_bn: bool = False            # batch norm in the head's hidden layers (DINO's ResNet option)
    freeze_last_layer_epochs: float = 1.0
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0
    center_momentum: float = 0.9
    centering: str = "ema"           # ema (DINO) | sinkhorn (DINOv2's Sinkhorn-Knopp targets)
    koleo_weight: float = 0.0        # DINOv2's KoLeo spread term on the student's pooled features
    dense_weight: float = 0.0        # dino only: weight of the patch-level loss between the global views
    dense_out_dim: int = 1024        # its head: prototypes, hidden width, which dense map
    dense_hidden_dim: int = 512
    dense_level: int = -1            # index into the backbone's dense maps (-1: last stage / block)
    momentum_teacher: float = 0.996  # cosine to 1.0 over training, per step
    # views
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    anatomy: AnatomyConfig = field(default_factory=AnatomyConfig)  # method: anatomy only
    # optimisation
    epochs: int = 100
    batch_size: int = 32             # per process
    base_lr: float = 5e-4            # scaled by total batch / 256
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    optimizer: str = "adamw"         # adamw | sgd (momentum 0.9; DINO's ResNet recipe)
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0           # global gradient norm; 0 disables
    # runtime
    precision: str = "auto"          # auto | bf16 | fp16 | fp32
    compile: bool = False
    num_workers: int = 2
    seed: int = 0
    max_steps: int | None = None     # stop early (schedules still span all epochs); 0 = export init
    steps_per_epoch: int | None = None  # required only for sources without len()
    checkpoint_every: int = 200      # steps; also at every epoch end
    log_every: int = 10

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad key."""
        positive = ("out_dim", "hidden_dim", "bottleneck_dim", "dense_out_dim", "dense_hidden_dim",
                    "global_size", "local_size", "epochs", "batch_size", "base_lr", "student_temp",
                    "teacher_temp", "warmup_teacher_temp", "checkpoint_every", "log_every")
        for key in positive:
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.input_norm not in INPUT_NORMS:
            raise ConfigError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, got {self.input_norm!r}")
        if self.centering not in ("ema", "sinkhorn"):
            raise ConfigError(f"centering must be ema or sinkhorn, got {self.centering!r}")
        if self.koleo_weight < 0:
            raise ConfigError(f"koleo_weight must be >= 0, got {self.koleo_weight}")
        if self.dense_weight < 0:
            raise ConfigError(f"dense_weight must be >= 0, got {self.dense_weight}")
        if self.dense_weight > 0 and self.method != "dino":
            raise ConfigError(f"dense_weight applies to method dino, not {self.method!r}; set it to 0")
        if self.n_local < 0:
            raise ConfigError(f"n_local must be >= 0, got {self.n_local}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        for key in ("momentum_teacher", "center_momentum"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key} must lie in [0, 1], got {getattr(self, key)}")
        for key in ("global_scale", "local_scale"):
            lo, hi = getattr(self, key)
            if not 0.0 < lo <= hi <= 1.0:
                raise ConfigError(f"{key} must be (lo, hi) with 0 < lo <= hi <= 1, got {(lo, hi)}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0 when given (0 exports the initial weights), "
                              f"got {self.max_steps}")
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise ConfigError(f"steps_per_epoch must be positive when given, got {self.steps_per_epoch}")
