"""Test bits/dim of the conditional VAE with and without a flow in its posterior, at the same
budget (the default pipeline's cvae job: width 32, batch 64, 700 steps), over several seeds.

    python bench/bench_posterior_flows.py --dataset datasets/pyramid/digits \
        --flows none planar:8 iaf:4 --seeds 0 1 2

Prints a table: mean ± standard deviation over seeds of the negative ELBO on the test split in
bits/dim (an upper bound on -log2 p(x|y) per dimension; one z sample per image), and its KL
part. Needs a prepared dataset (`dvc repro prepare@digits`). Trains in this process (no Ray,
no MLflow): it measures the model, not the pipeline.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch


def run(
    dataset: str, flow: str, seed: int, steps: int, batch: int, width: int
) -> tuple[float, float]:
    from gm.config import from_dict
    from gm.data.parquet import level_path
    from gm.data.readers import to_unit_range
    from gm.data.rowstore import RowStore
    from gm.registry import families
    from gm.train.loop import Trainer
    from gm.train.protocol import Batch, DataInfo

    level = level_path(dataset, 32)
    train, test = (RowStore(level, ("image",), split=s, mode="auto") for s in ("train", "test"))
    x_tr, y_tr = [], []
    for pixels, labels in train.batches(None, 500):
        x_tr.append(to_unit_range(pixels))
        y_tr.append(labels)
    x_tr, y_tr = torch.cat(x_tr), torch.cat(y_tr)
    kind, _, length = flow.partition(":")
    pf = {"kind": kind, "length": int(length)} if kind != "none" else {"length": 0}
    torch.manual_seed(seed)
    fam = families()["cvae"]
    cfg = from_dict(fam.config, {"width": width, "posterior_flow": pf}, "cvae")
    trainer = Trainer(fam.build(cfg, DataInfo(32, x_tr.shape[1], int(y_tr.max()) + 1)))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x_tr), (batch,), generator=g)
        trainer.train_step(Batch(x_tr[idx], y_tr[idx]))
    model = trainer.model.eval()
    torch.manual_seed(seed)
    bpd, kl = [], []
    with torch.no_grad():
        for pixels, labels in test.batches(None, 500):
            x = to_unit_range(pixels)
            nll, k = model.vae(x, labels)
            dims = x[0].numel() * math.log(2)
            bpd.append((nll + k) / dims)
            kl.append(k / dims)
    return float(torch.cat(bpd).mean()), float(torch.cat(kl).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="datasets/pyramid/digits")
    ap.add_argument("--flows", nargs="+", default=["none", "planar:8", "iaf:4"],
                    help="none, or kind:length (planar, radial, iaf)")  # fmt: skip
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"cvae width {args.width}, {args.steps} steps of {args.batch}, seeds {args.seeds}")
    print("| posterior flow | test bits/dim (mean ± sd) | KL part | per seed | s/run |")
    print("|---|---|---|---|---|")
    base = None
    for flow in args.flows:
        t = time.time()
        res = [run(args.dataset, flow, s, args.steps, args.batch, args.width) for s in args.seeds]
        sec = (time.time() - t) / len(args.seeds)
        b = [r[0] for r in res]
        mean, sd = statistics.mean(b), statistics.stdev(b) if len(b) > 1 else 0.0
        base = mean if base is None else base
        kl = statistics.mean(r[1] for r in res)
        print(f"| {flow} | {mean:.3f} ± {sd:.3f} ({mean - base:+.3f}) | {kl:.3f} | "
              + ", ".join(f"{v:.3f}" for v in b) + f" | {sec:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
