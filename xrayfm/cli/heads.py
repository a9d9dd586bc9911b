"""``xrayfm heads train``, ``xrayfm evaluate``, ``xrayfm embed``: task heads on a backbone."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from xrayfm.cli import TTA_HELP, UserError, app

heads_app = typer.Typer(help="Train task heads (classify, segment, segment_vertebrae, detect) on a frozen or "
                        "fine-tuned backbone.",
                        no_args_is_help=True)
app.add_typer(heads_app, name="heads")

_Opt = typer.Option
BackboneOpt = Annotated[str, _Opt("--backbone", help="Pretrain run folder or exported backbone bundle.")]
LakeOpt = Annotated[str, _Opt("--lake", help="Lake folder or fsspec URL.")]
LabelsOpt = Annotated[str, _Opt("--labels", help="Synth labels.parquet, or the synth run folder holding it.")]


@contextmanager
def _bar(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _load_items(lake: str, labels: str, split: str) -> list[Any]:
    from xrayfm.tasks.data import load_labeled_images

    items, unlabelled = load_labeled_images(lake, labels, split)
    if unlabelled:
        typer.echo(f"note: {unlabelled} {split} lake images have no synth label and are left out", err=True)
    return items


def _has_classifier(heads: list[str]) -> bool:
    """Whether any head bundle is a classifier (only then are train images needed for kNN)."""
    for h in heads:
        card = Path(h) / "head.json"
        if card.is_file() and json.loads(card.read_text()).get("task") == "classify":
            return True
    return False


def _record_dir(out: Path) -> Path:
    """Folder for the run record of a single-file output: ``metrics.json`` -> ``metrics_run/``
    (never the output's own folder, which may be a head bundle with its own config.yaml)."""
    return out.parent / f"{out.stem}_run"


def _user_errors() -> tuple[type[Exception], ...]:
    from xrayfm.config import ConfigError
    from xrayfm.lake import LakeError

    return (ConfigError, LakeError, ValueError, FileNotFoundError)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


@heads_app.command("train")
def train_cmd(
    backbone: BackboneOpt,
    task: Annotated[str, _Opt(help="classify, segment (metal), segment_vertebrae or detect.")],
    lake: LakeOpt,
    labels: LabelsOpt,
    out: Annotated[Path, _Opt(help="Head bundle folder to write.")],
    head: Annotated[str | None, _Opt(help="Registered head (default: linear / seg_decoder / screw_keypoints).")] = None,
    config: Annotated[Path | None, _Opt(help="YAML HeadTrainConfig; options given here override it.")] = None,
    epochs: Annotated[int | None, _Opt(help="Epochs [30].")] = None,
    batch_size: Annotated[int | None, _Opt(help="Images per step [32].")] = None,
    lr: Annotated[float | None, _Opt(help="Head learning rate (one-cycle peak) [1e-2].")] = None,
    img_size: Annotated[int | None, _Opt(help="Square input size in px, multiple of 32 [224].")] = None,
    label_fraction: Annotated[float | None, _Opt(help="Fraction of labelled train images per class "
                                                 "(<= 1), or images per class (> 1) [1.0].")] = None,
    unfreeze: Annotated[int | None, _Opt(help="Fine-tune the last N blocks/stages; -1 = all [0].")] = None,
    augment: Annotated[bool | None, _Opt("--augment/--no-augment", help="Random crop + flip each step "
                                         "(runs the backbone every step); default off.")] = None,
    dihedral: Annotated[bool | None, _Opt("--dihedral/--no-dihedral", help="Random rot90/mirror (8 exact "
                                          "transforms) per image each epoch; without --augment/--unfreeze "
                                          "the feature cache holds all 8 (8x memory); default off.")] = None,
    feature_norm: Annotated[str | None, _Opt(help="Pooled heads' input: 'standardize' (train-set feature "
                                             "statistics) or 'layernorm' (per image) [standardize].")] = None,
    pool: Annotated[str | None, _Opt(help="Pooled heads' embedding: 'final' (the backbone's own), 'multilevel' "
                                     "(average of every dense level) or 'auto' (multilevel for ResNets, "
                                     "final for ViTs) [auto].")] = None,
    out_stride: Annotated[int | None, _Opt(help="Segment/detect heads' output stride 4, 2 or 1 (finer: thin "
                                           "metal, screws whose ends lie a few px apart) [segment 2, "
                                           "detect and segment_vertebrae 4].")] = None,
    image_skip: Annotated[bool | None, _Opt("--image-skip/--no-image-skip", help="Segment/detect heads also "
                                            "read the input image at their output stride (thin metal "
                                            "edges, screw ends); default on for segment and detect, off for "
                                            "segment_vertebrae.")] = None,
    tune_threshold: Annotated[bool | None, _Opt("--tune-threshold/--no-tune-threshold",
                                                help="Choose the mask probability (segment) or screw score "
                                                "(detect) threshold that maximises val Dice / F1; default on.")] = None,
    match_px: Annotated[float | None, _Opt(help="Detect: screw matching radius in image pixels for the val "
                                           "threshold and metrics; scale it with the image [10].")] = None,
    device: Annotated[str | None, _Opt(help="auto (the GPU when there is one), cpu, cuda or cuda:N [auto].")] = None,
    precision: Annotated[str | None, _Opt(help="Head forward pass: auto (bf16 on a GPU or a CPU with fast "
                                          "bf16), bf16 or fp32 [auto].")] = None,
    seed: Annotated[int | None, _Opt(help="Seed [0].")] = None,
) -> None:
    """Train one head on the lake's train split (labels joined on pixel hash); report val metrics."""
    from xrayfm.config import from_dict, load_yaml, to_dict, write_run_record
    from xrayfm.models.card import load_backbone
    from xrayfm.models.runtime import module_device
    from xrayfm.tasks.base import get_task
    from xrayfm.tasks.data import label_subset
    from xrayfm.tasks.detect import DetectTask
    from xrayfm.tasks.train import (
        HeadTrainConfig,
        head_arguments,
        predict_items,
        record_operating_point,
        save_head_bundle,
        train_head,
    )

    given = {"task": task, "head": head, "epochs": epochs, "batch_size": batch_size, "lr": lr,
             "img_size": img_size, "label_fraction": label_fraction, "unfreeze": unfreeze,
             "augment": augment, "dihedral": dihedral, "feature_norm": feature_norm,
             "pool": pool, "out_stride": out_stride, "image_skip": image_skip, "tune_threshold": tune_threshold,
             "match_px": match_px, "device": device, "precision": precision, "seed": seed}
    t0 = time.time()
    try:
        base = load_yaml(HeadTrainConfig, config) if config else HeadTrainConfig()
        cfg = from_dict(HeadTrainConfig, {**to_dict(base), **{k: v for k, v in given.items() if v is not None}})
        cfg.validate()
        htask = get_task(cfg.task, cfg.num_classes)
        if isinstance(htask, DetectTask):
            htask.max_dist = cfg.match_px
        bb, card = load_backbone(backbone)
        train = [it for it in _load_items(lake, labels, "train") if htask.has_label(it)]
        # train_head takes the same deterministic subset; counted here for the bar and the summary
        n_used = len(label_subset(train, cfg.label_fraction, cfg.seed,
                                  key="region_index" if cfg.task == "classify" else None)) if train else 0
        total = n_used * (cfg.epochs + cfg.cache_views)
        with _bar(f"heads train {cfg.task}", total) as step:
            fitted, history = train_head(bb, train, cfg, progress=step)
        card = {**card, "source": str(backbone)}
        save_head_bundle(out, fitted, cfg, bb, card, history, head_arguments(htask, cfg))
        val = [it for it in _load_items(lake, labels, "val") if htask.has_label(it)]
        val_metrics: dict[str, Any] = {}
        op = None
        if val:
            with _bar("validate", len(val)) as step:
                soft = predict_items(bb, fitted, htask, val, cfg.img_size, progress=step, soft=True)
            if cfg.tune_threshold and (op := htask.tune_threshold(soft, val)) is not None:
                op |= {"split": "val", "n_images": len(val)}
                htask.apply_operating_point(op)
                record_operating_point(out, op)
            val_metrics = {k: v for k, v in htask.metrics(htask.decide(soft), val).items()
                           if not k.endswith("_per_image")}
            from xrayfm.config import atomic_write_text

            atomic_write_text(out / "metrics_val.json", json.dumps(_json_safe(val_metrics), indent=2))
        write_run_record(out, cfg, seed=cfg.seed, extra={"backbone": str(backbone), "lake": lake,
                                                         "device": str(module_device(bb)),
                                                         "labels": labels, "n_train": n_used,
                                                         "n_val": len(val), "history": history})
    except _user_errors() as exc:
        raise UserError(str(exc).splitlines()[0]) from exc
    key = {"classify": "accuracy", "detect": "ap"}.get(cfg.task, "dice_mean")
    shown = f"val {key} {val_metrics[key]:.4f}" if val_metrics.get(key) is not None else "no val split"
    if op is not None:
        shown += f" at threshold {op['threshold']:.3g} (val {op['criterion']} {op['value']:.4f}, " \
                 f"{op['at_default']:.4f} at the default)"
    print(f"trained {cfg.task} head {cfg.head or htask.default_head} on {n_used} images in "
          f"{time.time() - t0:.0f} s, final loss {history[-1]['loss']:.4f}, {shown} -> {out}")


@app.command("evaluate")
def evaluate_cmd(
    backbone: BackboneOpt,
    heads: Annotated[list[str], _Opt("--heads", help="Head bundle folder(s); repeat the option for several.")],
    lake: LakeOpt,
    labels: LabelsOpt,
    out: Annotated[Path, _Opt(help="metrics.json to write.")],
    split: Annotated[str, _Opt(help="Lake split to evaluate on.")] = "test",
    knn: Annotated[bool, _Opt("--knn/--no-knn", help="Also weighted kNN (k=20, T=0.07) for classification, "
                              "fitted on the train split.")] = True,
    classical: Annotated[bool, _Opt("--classical", help="Also PCA+SVM on features and on raw 32 px "
                                    "thumbnails (needs --knn).")] = False,
    device: Annotated[str, _Opt(help="auto (the GPU when there is one), cpu, cuda or cuda:N.")] = "auto",
    match_px: Annotated[float | None, _Opt(help="Screw matching radius in image pixels (scale it with the "
                                           "image size: 10 at 128 px, 20 at 256) [the radius the head "
                                           "was tuned with, else 10].")] = None,
    tta: Annotated[str, _Opt(help=TTA_HELP)] = "none",
) -> None:
    """Evaluate head bundles on a split and write metrics.json (see docs/heads.md for the keys)."""
    from xrayfm.config import atomic_write_text, write_run_record
    from xrayfm.tasks.evaluate import evaluate_heads
    from xrayfm.tasks.tta import tta_elements

    try:
        tta_elements(tta)  # before the lake loads
        items = _load_items(lake, labels, split)
        if not items:
            raise ValueError(f"no labelled images in split {split!r}; check --lake, --labels and --split")
        train = _load_items(lake, labels, "train") if knn and _has_classifier(heads) else None
        with _bar("evaluate", len(items) * len(heads)) as step:
            doc = evaluate_heads(backbone, heads, items, train, classical=classical, progress=step, device=device,
                                 match_px=match_px, tta=tta)
        doc["split"] = split
        atomic_write_text(out, json.dumps(_json_safe(doc), indent=2))
        write_run_record(_record_dir(out), {"backbone": backbone, "heads": heads, "lake": lake, "labels": labels,
                                      "split": split, "knn": knn, "classical": classical,
                                            "device": device, "match_px": match_px, "tta": tta})
    except _user_errors() as exc:
        raise UserError(str(exc).splitlines()[0]) from exc
    parts = []
    for section, key in (("classification", "accuracy"), ("segmentation", "dice_mean"),
                         ("vertebrae_segmentation", "dice_mean"), ("detection", "ap")):
        if section in doc and doc[section].get(key) is not None:
            parts.append(f"{section} {key} {doc[section][key]:.4f}")
    print(f"evaluated {len(heads)} head(s) on {len(items)} {split} images: {', '.join(parts)} -> {out}")


@app.command("embed")
def embed_cmd(
    backbone: BackboneOpt,
    lake: LakeOpt,
    out: Annotated[Path, _Opt(help="Parquet file to write (image_id, split, embedding).")],
    split: Annotated[str | None, _Opt(help="Only this lake split (default: all).")] = None,
    img_size: Annotated[int | None, _Opt(help="Input size in px (default: the backbone's).")] = None,
    batch_size: Annotated[int, _Opt(help="Images per forward pass.")] = 64,
) -> None:
    """Write the pooled backbone embedding of every lake image to a parquet file."""
    from xrayfm.config import write_run_record
    from xrayfm.lake import read_rows
    from xrayfm.tasks.evaluate import embed_lake

    where = f"split = '{split}'" if split else None
    try:
        if split is not None and split not in ("train", "val", "test"):
            raise ValueError(f"split {split!r} is not one of train, val, test")
        total = read_rows(lake, where=where, columns=["image_id"]).num_rows
        t0 = time.time()
        with _bar("embed", total) as step:
            n = embed_lake(backbone, lake, out, where=where, img_size=img_size, batch_size=batch_size,
                           progress=step)
        write_run_record(_record_dir(out), {"backbone": backbone, "lake": lake, "split": split, "img_size": img_size,
                                      "batch_size": batch_size})
    except _user_errors() as exc:
        raise UserError(str(exc).splitlines()[0]) from exc
    print(f"embedded {n} images in {time.time() - t0:.1f} s -> {out}")
