"""DVC stage `summary`: every evaluated model in one ranked table (Markdown + JSON metrics)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gm.cli import guarded
from gm.errors import DataError


def rank(evals: list[dict]) -> list[dict]:
    """Models grouped by dataset (numbers of different feature networks do not compare), each
    group sorted by FID (lower is better), then KID, then name; ``rank`` is within the group."""
    inf = float("inf")
    out = sorted(
        evals, key=lambda e: (e.get("dataset", ""), e.get("fid", inf), e.get("kid", inf), e["name"])
    )
    for i, e in enumerate(out):
        same = i > 0 and out[i - 1].get("dataset") == e.get("dataset")
        e["rank"] = out[i - 1]["rank"] + 1 if same else 1
    return out


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
    for e in evals:
        cells = []
        for key, _ in cols:
            if key not in e:
                cells.append("–")
                continue
            scale = 1e3 if key == "kid" else 1.0
            base = e.get(f"{key}_baseline")
            cell = f"{e[key] * scale:.3g}"
            if base is not None:
                cell += f" (real {base * scale:.3g})"
            cells.append(cell)
        lines.append(
            f"| {e.get('dataset', '')} | {e['rank']} | {e['name']} | {e['family']} | "
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
    if any("ood_auc_noise" in e for e in evals):
        notes += [
            "",
            "OOD AUC: an energy-based model's ROC-AUC at telling the real test images (low "
            "energy) from uniform noise and from the same images with their pixels shuffled "
            "(Du & Mordatch 2019); 0.5 is chance, 1 a perfect detector.",
        ]
    return "\n".join(lines + notes) + "\n"


@guarded
def main(argv: list[str] | None = None) -> int:
    from gm.io import write_json, write_text

    ap = argparse.ArgumentParser(prog="pipelines.summary", description=__doc__)
    ap.add_argument("--evals", required=True, help="folder of evaluate@<name> JSON files")
    ap.add_argument("--out", required=True, help="folder for summary.md and summary.json")
    args = ap.parse_args(argv)
    files = sorted(Path(args.evals).glob("*.json"))
    if not files:
        raise DataError(f"{args.evals}: no evaluation files")
    evals = rank([json.loads(f.read_text()) for f in files])
    out = Path(args.out)
    text = table(evals)
    write_text(out / "summary.md", "# Trained models, ranked by FID within each dataset\n\n" + text)
    write_json(
        out / "summary.json",
        {e["name"]: {k: v for k, v in e.items() if isinstance(v, int | float)} for e in evals},
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
