"""Pretraining in two gloo processes on one machine, for the DDP tests of the SSL methods."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from xray_images import real_xrays

from xrayfm.ssl import PretrainConfig, Trainer


def _ddp_worker(rank: int, world: int, port: int, out: str, cfg: PretrainConfig) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(cfg, Path(out) / "run", real_xrays(16), show_progress=False)
    trainer.fit()
    state = {k: v.detach().clone() for k, v in trainer.method.state_dict().items()}
    torch.save(state, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def train_two_ranks(cfg: PretrainConfig, out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train ``cfg`` on 16 real tiles in two processes (run folder ``out / "run"``); each rank's method state."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(out), cfg), nprocs=2, join=True)
    return torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
