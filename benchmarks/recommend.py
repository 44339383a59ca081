"""Benchmark: do the recommendation's rankings predict what the candidates realise?

Candidates, each pretrained here on the embedded source (the tl home's copy is reused): digits_cnn on
mnist with the default recipe (``augment: digits``) and the former one (``shift``), digits_cnn on
``mnist:base`` (classes 0-4 only), a ResNet-18 and timm's ResNet-10-T at 32x32 on mnist (3 epochs each);
every stage of each is a (backbone, stage) candidate. For each embedded target and shot count,
``tl.recommend`` scores them on the shots of the ``adapt`` split (three draws of them, seeds 0-2: each figure
is the mean over the draws) and 512 of its other images, unlabelled (``pool_im``), and the realised accuracy of a candidate is that of the better of the
``logistic`` and ``prototype`` strategies on its frozen embeddings, on test episodes (10-way, 15 queries).
Reports weighted Kendall's τ (scipy's ``weightedtau``: top ranks weigh most) between each score and the
realised accuracy, the top-1 regret, and the recommendation's time against the committed comparison's
cell time for the same target and shots (results/compare/summary.csv). Writes results/bench/recommend.md/.csv.

    python -m benchmarks.recommend                 # about 10 minutes on 2 cores once the candidates exist
    python -m benchmarks.recommend --smoke-test    # two digits_cnn candidates, 1 epoch, 5 episodes
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import _table
from workflows import _cli

TARGETS = ("mnistm", "optdigits")
SHOTS = (1, 5, 10)


def candidates(storage, smoke: bool) -> list[tuple[str, str, int | None]]:
    """(label, weights folder, input size) of each pretrained candidate, pretraining what is missing."""
    from tl.pretrain import PretrainConfig, pretrain

    small = {"epochs": 1, "limit": 600} if smoke else {}
    specs = [("digits_cnn mnist (digits)", PretrainConfig(**small)),
             ("digits_cnn mnist (shift)", PretrainConfig(augment="shift", **small))]
    if not smoke:
        specs += [("digits_cnn mnist:base (digits)", PretrainConfig(data="mnist:base")),
                  ("resnet18 mnist 32px (digits, 3 epochs)",
                   PretrainConfig(backbone="resnet18", input_size=32, epochs=3, workers=1)),
                  ("timm resnet10t mnist 32px (digits, 3 epochs)",
                   PretrainConfig(backbone="timm:resnet10t", input_size=32, epochs=3, workers=1))]
    out = []
    for label, cfg in specs:
        res = pretrain(cfg, storage, log=lambda _: None)
        out.append((label, cfg.backbone, str(res.path), cfg.input_size))
    return out


def realised(cands, target: str, shots: int, episodes: int, cache: dict) -> dict[tuple[str, int], float]:
    """Accuracy on test episodes of the better of logistic and prototype on each candidate's embeddings."""
    from tl.data import load_embedded
    from tl.evaluate import run_episodes
    from tl.models import make_backbone
    from tl.recommend import stage_features
    from tl.strategies import make_strategy

    test = load_embedded(target).split("test")
    strategies = {n: make_strategy(n) for n in ("logistic", "prototype")}
    out = {}
    for label, backbone, weights, size in cands:
        key = (label, target)
        if key not in cache:
            bb = make_backbone(backbone, weights, size)
            cache[key] = stage_features(bb, test.images, list(range(1, bb.num_stages + 1)))
        for stage, vectors in cache[key].items():
            rows = pd.DataFrame(run_episodes(strategies, test, shots=shots, queries=15, episodes=episodes, seed=0,
                                             embeddings=vectors))
            out[(label, stage)] = float(rows.groupby("strategy")["accuracy"].mean().max())
    return out


def main() -> int:
    p = _cli.parser("recommend", "Benchmark transferability scores against realised few-shot accuracy.",
                    package="benchmarks")
    p.add_argument("--episodes", type=int, default=20, help="test episodes per (candidate, stage) (default 20)")
    p.add_argument("--draws", type=int, default=3,
                   help="draws of the shots (seeds 0..draws-1) per target and shot count (default 3)")
    args = p.parse_args()

    from scipy.stats import weightedtau

    from tl.recommend import Candidate, RecommendConfig, recommend
    from tl.runtime import resolve_storage
    from tl.transfer_scores import SCORES

    storage = resolve_storage(args.storage)
    _cli.init_ray(args.address)
    cands = candidates(storage, args.smoke_test)
    episodes = 5 if args.smoke_test else args.episodes
    compare = pd.read_csv(Path(__file__).resolve().parent.parent / "results" / "compare" / "summary.csv")
    from tl.data import load_embedded

    for target in TARGETS:  # parsed once per process, as a comparison has them before it recommends
        load_embedded(target)
    rows, cache, taus = _table.Rows(), {}, {k: [] for k in (*SCORES, "ensemble")}
    regrets, ratios, told, lowest = [], [], [], []
    draws = list(range(1 if args.smoke_test else args.draws))
    for target in TARGETS:
        for shots in SHOTS:
            every = [Candidate(backbone=b, weights=w, input_size=s, name=lab) for lab, b, w, s in cands]
            # the comparison's own candidates first (the first recommendation of the process at mnistm 1-shot):
            # its backbone, results/compare's, at each stage
            own = recommend(RecommendConfig(candidates=every[:1], target=target, shots=shots), storage,
                            log=lambda _: None)
            real = realised(cands, target, shots, episodes, cache)
            part = f"{target} {shots}-shot"
            # one draw of 10-100 shots is a noisy sample: the same candidates rank differently from one draw to the
            # next, so each figure is the mean over draws of the shots (seeds), each draw's value in the note
            per: dict[str, list[float]] = {}
            counts: dict[str, int] = {}
            setting_regrets, picks, times = [], [], []
            for seed in draws:
                rec = recommend(RecommendConfig(candidates=every, target=target, shots=shots, seed=seed), storage,
                                log=lambda _: None)
                times.append(rec["seconds"])
                got = np.array([real[(r["candidate"], r["stage"])] for r in rec["rows"]])
                for k in SCORES:
                    vals = np.array([np.nan if r["scores"][k] is None else r["scores"][k] for r in rec["rows"]])
                    ok = np.isfinite(vals)
                    if ok.sum() >= 3:
                        per.setdefault(k, []).append(float(weightedtau(vals[ok], got[ok])[0]))
                        counts[k] = int(ok.sum())
                per.setdefault("ensemble", []).append(
                    float(weightedtau(-np.array([r["ensemble_rank"] for r in rec["rows"]]), got)[0]))
                ensemble_of = rec["ensemble_of"]
                regret = 100 * float(got.max() - got[0])
                setting_regrets.append(regret)
                if rec["can_tell"]:
                    told.append(regret)
                top, best = rec["rows"][0], rec["rows"][int(got.argmax())]
                picks.append(f"seed {seed}: {top['candidate']} stage {top['stage']} ({100 * got[0]:.1f}%), best "
                             f"{best['candidate']} stage {best['stage']} ({100 * got.max():.1f}%), "
                             + ("can tell" if rec["can_tell"] else "says it cannot tell")
                             + ("" if rec["wins"] is None else f" (wins {rec['wins']:.0%})"))
            for k, v in per.items():
                taus[k].append(float(np.mean(v)))
                what = "ensemble rank" if k == "ensemble" else k
                note = (f"{len(rec['rows'])} candidates; ranks of {', '.join(ensemble_of)}" if k == "ensemble"
                        else f"{counts[k]} candidates")
                rows.record(part, f"weighted Kendall tau, {what}", round(float(np.mean(v)), 3), "",
                            f"{note}; mean of {len(v)} draws: " + ", ".join(f"{t:.3f}" for t in v))
            lowest.append((float(np.mean(per["ensemble"])), part))
            regrets += setting_regrets
            rows.record(part, "top-1 regret", round(float(np.mean(setting_regrets)), 1), "points",
                        f"mean of {len(draws)} draws; " + "; ".join(picks))
            cell = compare[(compare["target"] == target) & (compare["shots"] == shots)]["cell_seconds"].sum()
            ratios.append(cell / own["seconds"])
            rows.record(part, "recommendation time, the comparison's backbone", round(own["seconds"], 2), "s",
                        f"{cands[0][0]}, {len(own['rows'])} stages; the comparison's cells for the same target and "
                        f"shots (results/compare): {cell:.0f} s ({cell / own['seconds']:.0f}x)")
            rows.record(part, "recommendation time, every candidate", round(float(np.median(times)), 2), "s",
                        f"{len(cands)} backbones, {len(rec['rows'])} (backbone, stage) candidates; median of "
                        f"{len(times)} draws")
    for k, v in taus.items():
        if v:
            rows.record("all", f"mean weighted Kendall tau, {k}", round(float(np.mean(v)), 3), "",
                        f"{len(v)} (target, shots) settings")
    low, where = min(lowest)
    rows.record("all", "lowest weighted Kendall tau, ensemble", round(low, 3), "", f"{where} (mean of its draws)")
    rows.record("all", "mean top-1 regret", round(float(np.mean(regrets)), 2), "points",
                f"{len(regrets)} (setting, draw) pairs; max {max(regrets):.1f}")
    if told:
        rows.record("all", "mean top-1 regret where it says it can tell", round(float(np.mean(told)), 2), "points",
                    f"{len(told)} of {len(regrets)} (setting, draw) pairs; max {max(told):.1f}")
    rows.record("all", "speed-up over the comparison it predicts", round(float(np.min(ratios)), 1), "x",
                f"the comparison's backbone; smallest of the 6 settings; median {np.median(ratios):.0f}x")
    cmd = p.prog + (" --smoke-test" if args.smoke_test else "") + ("" if args.draws == 3 else f" --draws {args.draws}")
    _table.save(rows, Path(args.output or "results/bench"), "recommend", args.smoke_test, [
        "# Recommendation against realised accuracy", "",
        f"Command: `{cmd}` on {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}. Candidates: "
        + "; ".join(lab for lab, *_ in cands) + ", at every stage. Realised: the better of logistic and prototype "
        f"on the candidate's frozen embeddings, {episodes} test episodes (10-way, 15 queries) per setting. The "
        f"recommendation scores the shots of the adapt split, drawn {len(draws)} times (seeds "
        f"{', '.join(map(str, draws))}), and 512 of its other images without their labels (pool_im; at one shot per "
        "class the ensemble leaves LogME and H-score out). Each τ and regret is the mean over the draws, each draw's "
        "value in the note: the candidates' realised accuracies do not depend on the draw, but the scores of 10 to 100 "
        "shots do, so one draw is a noisy measurement of a score. Its time (loading each "
        "candidate's weights, embedding the shots and the pool at every stage, the scores and 100 bootstrap "
        "resamples) excludes pretraining and the "
        "parsing of the embedded data sets, done once per process before (a comparison has them loaded). The comparison "
        "time is the sum of the cell times of results/compare/summary.csv for the same target and shots; that comparison "
        "has one backbone (the first candidate), so the speed-up is that of the recommendation over its stages."])
    return 0


if __name__ == "__main__":
    _cli.run(main)
