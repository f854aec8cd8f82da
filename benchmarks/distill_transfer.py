"""Digits transfer set: KD from a CNN teacher vs the same MLP student on labels alone, 3 seeds.

Reports the 10%-label transfer-set setting (the tested claim) and the full-label case, where a
tiny student gains little from KD. ``ours``/``baseline`` are mean test accuracies (10% labels).
Run: ``python benchmarks/distill_transfer.py [--quick]`` (quick: one seed).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from test_distill_digits import transfer  # noqa: E402  (the tested experiment, not a copy)

from common import write  # noqa: E402


def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    gains = np.array([100 * (r["kd"] - r["baseline"]) for r in runs])
    return {"baseline_acc": [round(r["baseline"], 4) for r in runs], "kd_acc": [round(r["kd"], 4) for r in runs],
            "gain_pt_mean": round(float(gains.mean()), 2), "gain_pt_std": round(float(gains.std()), 2),
            "gain_pt_min": round(float(gains.min()), 2), "gain_pt_max": round(float(gains.max()), 2)}


def main(quick: bool) -> None:
    seeds = range(1 if quick else 3)
    tenth = [transfer(s, 0.1) for s in seeds]
    full = [transfer(s, 1.0) for s in seeds]
    t10, tf = _summary(tenth), _summary(full)
    write("distill_transfer", ours=float(np.mean([r["kd"] for r in tenth])),
          baseline=float(np.mean([r["baseline"] for r in tenth])), unit="accuracy",
          goal="10% labels: KD - labels-only >= 2 pt (mean over seeds)", holds=t10["gain_pt_mean"] >= 2.0,
          details={"seeds": len(seeds), "teacher_acc": round(tenth[0]["teacher"], 4),
                   "setting": "MLP(128,128) student, alpha=0.5, T=4, 10 epochs over the train inputs, "
                              "baseline: same init and adam steps on the labeled rows",
                   **{f"10%_{k}": v for k, v in t10.items()}, **{f"full_{k}": v for k, v in tf.items()}})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
