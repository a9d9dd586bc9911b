"""``xrayfm pretrain``: self-supervised pretraining of a backbone on a lake (DINO by default)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from xrayfm.cli import UserError, app


def _lake_filter(split: str | None, where: str | None) -> str | None:
    parts = [f"split = '{split}'" if split else None, f"({where})" if where else None]
    return " AND ".join(p for p in parts if p) or None


@app.command("pretrain")
def pretrain_cmd(
    lake: str | None = typer.Option(None, help="Lake folder or fsspec URL to train on."),
    out: Path | None = typer.Option(None, help="Run folder: checkpoints, metrics, exported backbone."),
    arch: str | None = typer.Option(None, help="Backbone, see --list (default vit_small_patch16)."),
    method: str | None = typer.Option(None, help="SSL method (default dino)."),
    config: Path | None = typer.Option(None, help="YAML PretrainConfig; options given here override it."),
    epochs: int | None = typer.Option(None, help="Epochs (default 100)."),
    batch_size: int | None = typer.Option(None, help="Images per process and step (default 32)."),
    init: str | None = typer.Option(None, help="Start from local timm/DINO/HF weights (.pth/.safetensors)."),
    resume: bool = typer.Option(False, "--resume", help="Require a checkpoint in --out to continue from "
                                "(without it, an existing checkpoint is still continued)."),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile the backbones."),
    precision: str | None = typer.Option(None, help="auto, bf16, fp16 or fp32 (default auto: bf16 on GPU "
                                         "and for CNNs on CPU)."),
    global_size: int | None = typer.Option(None, help="Global crop size in px (default 224)."),
    local_size: int | None = typer.Option(None, help="Local crop size in px (default 96)."),
    n_local: int | None = typer.Option(None, help="Local crops per image (default 8)."),
    out_dim: int | None = typer.Option(None, help="DINO prototypes (default 4096)."),
    input_norm: str | None = typer.Option(None, help="fixed (default) or equalize: histogram-equalise each "
                                          "image in the model, blind to brightness, contrast and gamma."),
    dense_weight: float | None = typer.Option(None, help="Weight of the patch-level DINO term between the global "
                                              "views (default 0 = off; dense_level / dense_out_dim in --config)."),
    split: str | None = typer.Option(None, help="Lake split to use, or 'all' (default train)."),
    where: str | None = typer.Option(None, help="Extra SQL predicate over lake metadata columns."),
    max_steps: int | None = typer.Option(None, help="Stop after N steps (schedules span all epochs); 0 exports the initial "
                                           "random weights, the baseline pretraining must beat."),
    num_workers: int | None = typer.Option(None, help="Data-loading processes per process (default 2)."),
    seed: int | None = typer.Option(None, help="Seed of weights, data order and augmentations (default 0)."),
    knn_labels: Path | None = typer.Option(None, help="Synth labels.parquet (or its run folder) of the lake's images: after each epoch, "
                                           "log weighted-kNN body-region accuracy (train split as memory bank, val "
                                           "split as queries) to monitor.jsonl."),
    list_archs: bool = typer.Option(False, "--list", help="List backbones and methods, then exit."),
) -> None:
    """Pretrain a backbone self-supervised; re-running on the same --out resumes. Launch DDP with
    `torchrun --nproc_per_node=N $(which xrayfm) pretrain ...`."""
    from xrayfm.config import ConfigError, from_dict, load_yaml, to_dict
    from xrayfm.models import list_backbones
    from xrayfm.ssl import PretrainConfig, list_methods, train

    if list_archs:
        print("backbones: " + ", ".join(list_backbones()))
        print("methods: " + ", ".join(list_methods()))
        return
    if out is None:
        raise UserError("no run folder given; pass --out RUN")
    overrides = {k: v for k, v in dict(
        lake=lake, arch=arch, method=method, epochs=epochs, batch_size=batch_size, init=init, compile=compile,
        precision=precision, global_size=global_size, local_size=local_size, n_local=n_local, out_dim=out_dim,
        input_norm=input_norm, dense_weight=dense_weight,
        split=split, where=where, max_steps=max_steps, num_workers=num_workers, seed=seed).items()
        if v is not None}
    if split == "all":
        overrides["split"] = None
    try:
        base = load_yaml(PretrainConfig, config) if config else PretrainConfig()
        cfg = from_dict(PretrainConfig, {**to_dict(base), **overrides})
        cfg.validate()
        if cfg.arch not in list_backbones():
            raise ConfigError(f"unknown arch {cfg.arch!r}; choose one of {', '.join(list_backbones())}")
        if cfg.lake is None:
            raise ConfigError("no lake given; pass --lake LAKE (or set lake: in the --config YAML)")
        dataset, n_images = _open_lake(cfg.lake, cfg.split, cfg.where, cfg.seed)
        monitor = None
        if knn_labels is not None:
            from xrayfm.tasks.evaluate import knn_monitor

            if not knn_labels.exists():
                raise ConfigError(f"--knn-labels {knn_labels} does not exist; pass the synth labels.parquet "
                                  "or its synth run folder")
            monitor = knn_monitor(cfg.lake, knn_labels, cfg.global_size)
        summary = train(cfg, out, dataset, n_images=n_images, resume=True if resume else None,
                        data_summary={"lake_query": _lake_filter(cfg.split, cfg.where)}, monitor=monitor)
    except (ConfigError, ValueError, FileNotFoundError, FloatingPointError) as exc:
        raise UserError(str(exc).splitlines()[0]) from exc
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line from rank 0
        print(summary.line())


def _open_lake(lake: str, split: str | None, where: str | None, seed: int) -> tuple[object, int]:
    """The lake's training dataset and its total image count (all ranks)."""
    from xrayfm.config import ConfigError
    from xrayfm.lake import LakeDataset, LakeError, read_rows

    try:
        n_images = read_rows(lake, where=_lake_filter(split, where), columns=["image_id"]).num_rows
        dataset = LakeDataset(lake, split=split, where=where, shuffle=True, seed=seed)
    except LakeError as exc:
        raise ConfigError(str(exc)) from exc
    if n_images == 0:
        raise ConfigError(f"lake {lake} has no images for split={split!r} where={where!r}; "
                          "check --split/--where or ingest images first")
    return dataset, n_images
