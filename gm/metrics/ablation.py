"""Seed-averaged ablations: training jobs that differ only in what is ablated and in their
seed, grouped, each setting summarized by the mean and spread of its evaluation metrics.

One training run ranks nothing: the same job on two machines has moved the default DCGAN's
FID by a factor of two. An ablation in gm is therefore a set of ``train`` jobs whose configs
are identical except for the ablated key (by default ``model.augment``: none, ada, diffaug)
and ``run.seed``. :func:`ablation_rows` finds such groups among the evaluated jobs (no naming
convention needed) and reports, per group and setting, the mean, the sample standard
deviation (n − 1) and the values of FID, KID, precision, recall and conditional accuracy
over the seeds. ``presets/quality`` trains one such ablation per GAN family; the ``summary``
stage prints the table (:func:`ablation_table`).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

# what an ablation varies besides the ablated key: the seed, and ADA's own settings (which
# only mean something for the ada setting)
VARIED = ("run.seed", "model.ada_target", "model.ada_kimg", "model.ada_interval")
METRICS = ("fid", "kid", "precision", "recall", "conditional_accuracy")


def job_leaves(job) -> dict[str, Any]:
    """A ``gm.train.job.TrainConfig`` as dotted keys (``model.augment``, ``run.seed`` ...),
    every family default filled in (``gm.tune.base_config``), so that a key written out at its
    default value and a key left unset compare equal."""
    from gm.tracking import leaves
    from gm.tune import base_config

    where = {"family": job.family, "dataset": job.dataset, "pairs": job.pairs,
             "resolution": job.resolution}  # fmt: skip
    return leaves(where | base_config(job))


def ablation_rows(
    evals: Iterable[Mapping[str, Any]], jobs: Mapping[str, Any], key: str = "model.augment"
) -> list[dict[str, Any]]:
    """Rows of the ablations among ``evals`` (evaluate@ results, each with ``name``).

    ``jobs`` maps each job name to its ``TrainConfig`` (``gm.params.load(...).train``). Jobs
    whose dotted configs agree on everything except ``key`` and :data:`VARIED` form a group;
    a group with at least two values of ``key`` is an ablation. One row per (group, value):
    ``group`` (the jobs' common name prefix, else the family), ``family``, ``dataset``,
    ``setting`` (the value of ``key``), ``jobs``, ``seeds``, ``n`` and, per
    metric present in every one of its jobs' results, ``<metric>_mean``, ``<metric>_std``
    (sample standard deviation, 0 for one seed) and ``<metric>_values`` (in seed order).
    A job missing from ``jobs`` (a removed params entry) is left out. Rows are sorted by
    group, then by the value's first appearance in ``none, ada, diffaug`` order (else name).
    """
    by_name = {e["name"]: e for e in evals}
    groups: dict[tuple, list[tuple[str, dict[str, Any]]]] = {}
    for name in sorted(by_name):
        if name not in jobs:
            continue
        flat = job_leaves(jobs[name])
        if key not in flat:
            continue
        ident = tuple(sorted((k, repr(v)) for k, v in flat.items() if k != key and k not in VARIED))
        groups.setdefault(ident, []).append((name, flat))
    order = {"none": 0, "ada": 1, "diffaug": 2}
    rows = []
    for members in groups.values():
        settings = sorted({flat[key] for _, flat in members},
                          key=lambda v: (order.get(v, 99), str(v)))  # fmt: skip
        if len(settings) < 2:
            continue
        prefix = os.path.commonprefix([n for n, _ in members]).rstrip("_-.")
        prefix = prefix or members[0][1]["family"]
        for setting in settings:
            chosen = sorted(
                ((flat.get("run.seed", 0), n) for n, flat in members if flat[key] == setting)
            )
            row: dict[str, Any] = {
                "group": prefix,
                "family": members[0][1]["family"],
                "dataset": members[0][1]["dataset"],
                "setting": setting,
                "jobs": [n for _, n in chosen],
                "seeds": [s for s, _ in chosen],
                "n": len(chosen),
            }
            for m in METRICS:
                values = [by_name[n].get(m) for _, n in chosen]
                if any(not isinstance(v, int | float) for v in values):
                    continue
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                row |= {f"{m}_mean": statistics.fmean(values), f"{m}_std": std,
                        f"{m}_values": values}  # fmt: skip
            rows.append(row)
    return sorted(rows, key=lambda r: (r["group"], order.get(r["setting"], 99), str(r["setting"])))


def ablation_table(rows: list[dict[str, Any]], key: str = "model.augment") -> str:
    """Markdown: one line per (group, setting), each metric as mean ± standard deviation over
    the seeds; '' when there are no rows."""
    if not rows:
        return ""
    cols = [("fid", "FID", 1.0), ("kid", "KID×1e3", 1e3), ("precision", "precision", 1.0),
            ("recall", "recall", 1.0), ("conditional_accuracy", "cond. acc.", 1.0)]  # fmt: skip
    shown = [c for c in cols if any(f"{c[0]}_mean" in r for r in rows)]
    lines = [
        f"| group | family | dataset | {key} | seeds | " + " | ".join(c[1] for c in shown) + " |",
        "|" + "---|" * (5 + len(shown)),
    ]
    for r in rows:
        cells = []
        for m, _, scale in shown:
            if f"{m}_mean" not in r:
                cells.append("–")
                continue
            cell = f"{r[f'{m}_mean'] * scale:.3g} ± {r[f'{m}_std'] * scale:.2g}"
            cells.append(cell)
        seeds = ", ".join(str(s) for s in r["seeds"])
        lines.append(f"| {r['group']} | {r['family']} | {r['dataset']} | {r['setting']} | "
                     f"{seeds} | " + " | ".join(cells) + " |")  # fmt: skip
    notes = [
        "",
        f"Each line: the jobs of one group (identical configs apart from `{key}`, the seed "
        "and ADA's settings) trained with that setting, one run per seed; mean ± sample "
        "standard deviation over the seeds. A difference smaller than the spreads is not a "
        "ranking.",
    ]
    return "\n".join(lines + notes) + "\n"
