"""DVC stage `summary`: every evaluated model in one ranked table (Markdown + JSON metrics)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gm.cli import exit_now, guarded
from gm.errors import DataError
from gm.forkserver import run_main


def rank(evals: list[dict]) -> list[dict]:
    """Models grouped by dataset (numbers of different feature networks do not compare), each
    group sorted by FID (lower is better), then KID, then name; ``rank`` is within the group.
    A model whose FID interval (``fid_ci_low``/``fid_ci_high``, the evaluation's bootstrap)
    overlaps the interval of the first model of the rank above shares that rank: a tie, not an
    order the sampling noise could reverse. A model without an FID (too few images) has none.
    """
    inf = float("inf")
    out = sorted(
        evals, key=lambda e: (e.get("dataset", ""), e.get("fid", inf), e.get("kid", inf), e["name"])
    )
    seen: dict[str, int] = {}
    leader: dict[str, dict] = {}
    for e in out:
        if "fid" in (e.get("unavailable") or {}):
            continue  # no FID to rank by (too few images): shown unranked
        ds = e.get("dataset", "")
        seen[ds] = seen.get(ds, 0) + 1
        top = leader.get(ds)
        tied = top is not None and (
            e.get("fid") == top.get("fid")
            or e.get("fid_ci_low", inf) <= top.get("fid_ci_high", -inf)
        )
        if tied:
            e["rank"] = top["rank"]
        else:
            e["rank"] = seen[ds]
            leader[ds] = e
    return out


def _tied(evals: list[dict]) -> set[tuple[str, int]]:
    """(dataset, rank) pairs that more than one model holds."""
    count: dict[tuple[str, int], int] = {}
    for e in evals:
        if "rank" in e:
            key = (e.get("dataset", ""), e["rank"])
            count[key] = count.get(key, 0) + 1
    return {k for k, n in count.items() if n > 1}


def table(evals: list[dict]) -> str:
    cols = [
        ("fid", "FID"),
        ("kid", "KID×1e3"),
        ("precision", "precision"),
        ("recall", "recall"),
        ("conditional_accuracy", "cond. acc."),
        ("inception_score", "IS"),
        ("bits_per_dim", "bits/dim"),
        ("ood_auc_noise", "OOD AUC noise"),  # energy-based models: test vs noise, ROC-AUC
        ("ood_auc_shuffled", "OOD AUC shuffled"),  # test vs pixel-shuffled test images
    ]
    head = "| dataset | rank | model | family | step | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (5 + len(cols))]
    # metric → what precision_recall etc. withhold (gm.metrics.quality.MIN_IMAGES)
    owner = {"precision": "precision_recall", "recall": "precision_recall"}
    withheld = []
    ties = _tied(evals)
    for e in evals:
        cells = []
        missing = e.get("unavailable") or {}
        for key, _ in cols:
            if owner.get(key, key) in missing:
                cells.append("n/a¹")
                continue
            if key not in e:
                cells.append("–")
                continue
            scale = 1e3 if key == "kid" else 1.0
            base = e.get(f"{key}_baseline")
            cell = f"{e[key] * scale:.3g}"
            if f"{key}_ci_low" in e:
                cell += f" [{e[f'{key}_ci_low'] * scale:.3g}, {e[f'{key}_ci_high'] * scale:.3g}]"
            if base is not None:
                cell += f" (real {base * scale:.3g})"
            cells.append(cell)
        if missing:
            withheld.append(f"{e['name']}: {', '.join(missing)} ({next(iter(missing.values()))})")
        lines.append(
            f"| {e.get('dataset', '')} | {_rank_cell(e, ties)} | {e['name']} | {e['family']} | "
            f"{e['step']} | " + " | ".join(cells) + " |"
        )
    ex = {e["extractor"]["sha256"][:12]: e["extractor"] for e in evals}
    notes = [
        "",
        "Each number is followed by its real-data baseline: the same metric for real train "
        "images against the test split with the same sample count (what a perfect model "
        "scores here). Features: each dataset's domain classifier "
        + ", ".join(f"`{k}` ({v['path']}, {v['resize']})" for k, v in ex.items())
        + ".",
    ]
    if any("conditional_accuracy_baseline" in e for e in evals):
        notes += [
            "",
            "Conditional accuracy's real baseline: the domain classifier's accuracy on the "
            "real test images at the model's resolution, shown to it exactly as the samples "
            "are: "
            + "; ".join(f"{e['name']} {e['conditional_presentation']}" for e in evals
                        if "conditional_presentation" in e and "conditional_accuracy" in e)
            + ".",
        ]  # fmt: skip
    if any("fid_ci_low" in e for e in evals):
        notes += [
            "",
            "Brackets: 95 % intervals of each number's sampling uncertainty at these counts "
            "(FID, precision, recall: bootstrap over real and generated images; KID: ±1.96 "
            "standard deviations over its subsets; conditional accuracy: Wilson). They do not "
            "include the spread across training seeds or machines, which is larger. Models "
            "whose FID intervals overlap share a rank (`2=`).",
        ]
    if withheld:
        notes += [
            "",
            "¹ Not computed: too few images for the metric to mean anything (minimums in "
            "docs/evaluation.md); such a model is not ranked and no champion alias moves on it. "
            + "; ".join(withheld)
            + ".",
        ]
    if any("ood_auc_noise" in e for e in evals):
        notes += [
            "",
            "OOD AUC: an energy-based model's ROC-AUC at telling the real test images (low "
            "energy) from uniform noise and from the same images with their pixels shuffled "
            "(Du & Mordatch 2019); 0.5 is chance, 1 a perfect detector.",
        ]
    return "\n".join(lines + notes) + "\n"


def merge_detection(evals: list[dict], reports: list[dict]) -> None:
    """Each model's detectability from the detect@ reports into its evaluation dict, as
    ``detect_<metric>`` (``detect_auc``, ``detect_accuracy``, ``detect_auc_jpeg75`` ...)."""
    by_name = {e["name"]: e for e in evals}
    for rep in reports:
        for job, row in rep.get("models", {}).items():
            e = by_name.get(job)
            if e is None:
                continue
            if "unavailable" in row:
                e["detect_unavailable"] = row["unavailable"]
                continue
            e |= {f"detect_{k}": v for k, v in row.items()
                  if isinstance(v, float) and not isinstance(v, bool)}  # fmt: skip


def detection_table(evals: list[dict], reports: list[dict]) -> str:
    """Markdown: how detectable each model's images are (detect@ reports), '' when none."""
    rows = [e for e in evals if any(k.startswith("detect_") for k in e)]
    if not rows:
        return ""
    conds = []
    for rep in reports:
        conds += [c for c in rep.get("conditions", []) if c != "clean" and c not in conds]
    key = {c: "detect_auc_loo" if c == "leave-one-family-out" else f"detect_auc_{c}"
           for c in conds}  # fmt: skip
    label = {c: "AUC, family unseen" if c == "leave-one-family-out" else f"AUC after {c}"
             for c in conds}  # fmt: skip
    lines = [
        "| dataset | model | family | ROC-AUC | AP | accuracy (C2ST) | "
        + " | ".join(label[c] for c in conds)
        + " |",
        "|" + "---|" * (6 + len(conds)),
    ]
    ci = lambda e, k: (f"{e[k]:.3f} [{e[k + '_ci_low']:.3f}, {e[k + '_ci_high']:.3f}]"  # noqa: E731
                       if k + "_ci_low" in e else f"{e[k]:.3f}")  # fmt: skip
    for e in rows:
        if "detect_unavailable" in e:
            lines.append(
                f"| {e.get('dataset', '')} | {e['name']} | {e['family']} | n/a¹ | "
                + " | ".join("n/a¹" for _ in range(2 + len(conds)))
                + " |"
            )
            continue
        cells = [ci(e, "detect_auc"), f"{e['detect_ap']:.3f}", ci(e, "detect_accuracy")]
        cells += [f"{e[key[c]]:.3f}" if key[c] in e else "–" for c in conds]
        lines.append(f"| {e.get('dataset', '')} | {e['name']} | {e['family']} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    res = ", ".join(f"{r['dataset']} {r['resolution']}x{r['resolution']} (threshold "
                    f"{r['threshold']:.3g})" for r in reports)  # fmt: skip
    notes = [
        "",
        "A small CNN per dataset (detect@<dataset>, gm.detect; " + res + ") learned to tell "
        "real train images from 60 % of every model's evaluation samples; each model is "
        "scored on its held-out samples against the real test images at its resolution. "
        "ROC-AUC 0.5 and accuracy 0.5 mean the detector cannot tell the model's images from "
        "real ones (accuracy: balanced, at the threshold calibrated on validation images: "
        "the two-sample classifier test); 1 means every image is caught. Brackets: 95 % "
        "bootstrap intervals over the held-out images. The perturbed columns apply JPEG or a "
        "resize to real and generated test images alike; 'family unseen' is a detector "
        "trained without any sample of that family. Limits: docs/evaluation.md.",
    ]
    unavailable = [e for e in rows if "detect_unavailable" in e]
    if unavailable:
        notes += ["", "¹ " + "; ".join(f"{e['name']}: {e['detect_unavailable']}"
                                        for e in unavailable) + "."]  # fmt: skip
    return "\n".join(lines + notes) + "\n"


def _rank_cell(e: dict, ties: set[tuple[str, int]]) -> str:
    if "rank" not in e:
        return "–"
    return f"{e['rank']}=" if (e.get("dataset", ""), e["rank"]) in ties else str(e["rank"])


@guarded
def main(argv: list[str] | None = None) -> int:
    from gm.io import write_json, write_text

    ap = argparse.ArgumentParser(prog="pipelines.summary", description=__doc__)
    ap.add_argument("--evals", required=True, help="folder of evaluate@<name> JSON files")
    ap.add_argument("--detect", help="folder of detect@<dataset> JSON reports (optional)")
    ap.add_argument("--out", required=True, help="folder for summary.md and summary.json")
    ap.add_argument("--params", help="params.yaml: its train jobs' ablations, seed-averaged")
    args = ap.parse_args(argv)
    files = sorted(Path(args.evals).glob("*.json"))
    if not files:
        raise DataError(f"{args.evals}: no evaluation files")
    evals = rank([json.loads(f.read_text()) for f in files])
    detect = []
    if args.detect:
        detect = [json.loads(f.read_text()) for f in sorted(Path(args.detect).glob("*.json"))]
        merge_detection(evals, detect)
    out = Path(args.out)
    text = table(evals)
    found = detection_table(evals, detect)
    if found:
        text += "\n## How detectable each model's images are\n\n" + found
    numbers = {e["name"]: {k: v for k, v in e.items() if isinstance(v, int | float)}
               for e in evals}  # fmt: skip
    if args.params:
        from gm import params
        from gm.metrics.ablation import ablation_rows, ablation_table

        rows = ablation_rows(evals, params.load(args.params).train)
        if rows:
            text += "\n## Ablations: mean ± standard deviation over training seeds\n\n"
            text += ablation_table(rows)
        for r in rows:  # job names cannot hold "/": no clash with a model's entry
            numbers[f"ablation/{r['group']}/{r['setting']}"] = {
                k: v for k, v in r.items() if isinstance(v, int | float)
            }
    write_text(out / "summary.md", "# Trained models, ranked by FID within each dataset\n\n" + text)
    write_json(out / "summary.json", numbers)
    print(text)
    return 0


if __name__ == "__main__":
    exit_now(run_main(__spec__.name, main))
