"""The loop under DDP (2 CPU processes, gloo): gradients are averaged across ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gm.config import from_dict
from gm.registry import families
from gm.train.loop import Trainer

from .test_models_contract import INFO, TINY, batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ADA = {"augment": "ada", "ada_kimg": 0.01, "ada_interval": 1, "ada_target": 0.3}


def build(name):
    """A tiny family; ``<name>+ada``: with ADA adjusting p at every step."""
    torch.manual_seed(0)
    family, _, extra = name.partition("+")
    fam = families()[family]
    cfg = TINY[family] | (ADA if extra == "ada" else {})
    return fam.build(from_dict(fam.config, cfg, family), INFO)


def _worker(rank: int, world: int, port: int, name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        trainer = Trainer(build(name), distributed=True)
        torch.manual_seed(100 + rank)  # each rank draws its own noise, as in real training
        ps = []
        for step in range(4 if "+ada" in name else 2):
            m = trainer.train_step(batch(seed=10 * step + rank))  # each rank its own shard
            ps.append(m.get("D/ada_p", -1.0))
        params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        params["ada_p"] = torch.tensor(ps)  # ADA: p after each step
        torch.save(params, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["cgan", "cvae", "cgan+ada"])
def test_ranks_hold_identical_weights_after_steps(name, tmp_path):
    """... and, with ADA, the same p at every step: the sign statistics are summed over ranks
    (each rank's own data alone would steer its own p)."""
    mp.spawn(_worker, args=(2, _free_port(), name, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # and the update is not what rank 0's data alone gives: gradients were averaged
    solo = Trainer(build(name))
    torch.manual_seed(100)
    for step in range(2):
        solo.train_step(batch(seed=10 * step))
    assert any(not torch.equal(r0[k], v) for k, v in solo.model.named_parameters())
    if name.endswith("+ada"):
        assert r0["ada_p"].max() > 0  # p moved, identically on both ranks (checked above)
