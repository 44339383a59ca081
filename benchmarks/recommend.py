"""Benchmark: do the recommendation's rankings predict what the candidates realise?

Candidates, each pretrained here on the embedded source (the tl home's copy is reused): digits_cnn on
mnist with the default recipe (``augment: digits``) and the former one (``shift``), digits_cnn on
``mnist:base`` (classes 0-4 only), a ResNet-18 and timm's ResNet-10-T at 32x32 on mnist (3 epochs each);
every stage of each is a (backbone, stage) candidate. For each embedded target and shot count,
``tl.recommend`` scores them on the shots of the ``adapt`` split and 512 of its other images, unlabelled
(``pool_im``), and the realised accuracy of a candidate is that of the better of the
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
    regrets, ratios, told = [], [], []
    for target in TARGETS:
        for shots in SHOTS:
            every = [Candidate(backbone=b, weights=w, input_size=s, name=lab) for lab, b, w, s in cands]
            # the comparison's own candidates first (the first recommendation of the process at mnistm 1-shot):
            # its backbone, results/compare's, at each stage
            own = recommend(RecommendConfig(candidates=every[:1], target=target, shots=shots), storage,
                            log=lambda _: None)
            rec = recommend(RecommendConfig(candidates=every, target=target, shots=shots), storage, log=lambda _: None)
            real = realised(cands, target, shots, episodes, cache)
            got = np.array([real[(r["candidate"], r["stage"])] for r in rec["rows"]])
            part = f"{target} {shots}-shot"
            for k in SCORES:
                vals = np.array([np.nan if r["scores"][k] is None else r["scores"][k] for r in rec["rows"]])
                ok = np.isfinite(vals)
                if ok.sum() >= 3:
                    tau = float(weightedtau(vals[ok], got[ok])[0])
                    taus[k].append(tau)
                    rows.record(part, f"weighted Kendall tau, {k}", round(tau, 3), "", f"{int(ok.sum())} candidates")
            tau = float(weightedtau(-np.array([r["ensemble_rank"] for r in rec["rows"]]), got)[0])
            taus["ensemble"].append(tau)
            rows.record(part, "weighted Kendall tau, ensemble rank", round(tau, 3), "",
                        f"{len(got)} candidates; ranks of {', '.join(rec['ensemble_of'])}")
            regret = 100 * float(got.max() - got[0])
            regrets.append(regret)
            if rec["can_tell"]:
                told.append(regret)
            top = rec["rows"][0]
            best = rec["rows"][int(got.argmax())]
            rows.record(part, "top-1 regret", round(regret, 1), "points",
                        f"recommended {top['candidate']} stage {top['stage']} ({100 * got[0]:.1f}%); best "
                        f"{best['candidate']} stage {best['stage']} ({100 * got.max():.1f}%); "
                        + ("can tell" if rec["can_tell"] else "says it cannot tell")
                        + ("" if rec["wins"] is None else f" (wins {rec['wins']:.0%})"))
            cell = compare[(compare["target"] == target) & (compare["shots"] == shots)]["cell_seconds"].sum()
            ratios.append(cell / own["seconds"])
            rows.record(part, "recommendation time, the comparison's backbone", round(own["seconds"], 2), "s",
                        f"{cands[0][0]}, {len(own['rows'])} stages; the comparison's cells for the same target and "
                        f"shots (results/compare): {cell:.0f} s ({cell / own['seconds']:.0f}x)")
            rows.record(part, "recommendation time, every candidate", round(rec["seconds"], 2), "s",
                        f"{len(cands)} backbones, {len(rec['rows'])} (backbone, stage) candidates")
    for k, v in taus.items():
        if v:
            rows.record("all", f"mean weighted Kendall tau, {k}", round(float(np.mean(v)), 3), "",
                        f"{len(v)} (target, shots) settings")
    rows.record("all", "mean top-1 regret", round(float(np.mean(regrets)), 2), "points", f"max {max(regrets):.1f}")
    if told:
        rows.record("all", "mean top-1 regret where it says it can tell", round(float(np.mean(told)), 2), "points",
                    f"{len(told)} of {len(regrets)} settings; max {max(told):.1f}")
    rows.record("all", "speed-up over the comparison it predicts", round(float(np.min(ratios)), 1), "x",
                f"the comparison's backbone; smallest of the 6 settings; median {np.median(ratios):.0f}x")
    cmd = p.prog + (" --smoke-test" if args.smoke_test else "")
    _table.save(rows, Path(args.output or "results/bench"), "recommend", args.smoke_test, [
        "# Recommendation against realised accuracy", "",
        f"Command: `{cmd}` on {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}. Candidates: "
        + "; ".join(lab for lab, *_ in cands) + ", at every stage. Realised: the better of logistic and prototype "
        f"on the candidate's frozen embeddings, {episodes} test episodes (10-way, 15 queries) per setting. The "
        "recommendation scores the shots of the adapt split (seed 0) and 512 of its other images without their labels "
        "(pool_im; at one shot per class the ensemble leaves LogME and H-score out); its time (loading each "
        "candidate's weights, embedding the shots and the pool at every stage, the scores and 100 bootstrap "
        "resamples) excludes pretraining and the "
        "parsing of the embedded data sets, done once per process before (a comparison has them loaded). The comparison "
        "time is the sum of the cell times of results/compare/summary.csv for the same target and shots; that comparison "
        "has one backbone (the first candidate), so the speed-up is that of the recommendation over its stages."])
    return 0


if __name__ == "__main__":
    _cli.run(main)
