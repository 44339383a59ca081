"""Transferability scores: how well a frozen embedding of a target's labelled shots predicts their
labels, computed in milliseconds, without training (NumPy, SciPy, scikit-learn only).

Each score takes features ``F`` (n x d) and labels ``y`` (0..C-1); higher is better for every score.
- ``logme``: LogME (You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning"): the log marginal evidence of a Bayesian linear model from ``F`` to each one-hot label
  column, maximised over its prior and noise precisions (α, β) by the paper's fixed-point iteration,
  per sample, averaged over classes;
- ``h_score``: H-score (Bao et al. 2019, "An Information-Theoretic Approach to Transferability in Task
  Transfer Learning") with the shrinkage of Ibrahim et al. 2022 ("Newer is not always better:
  Rethinking transferability metrics, their peculiarities, stability and performance"):
  tr(Σ_α⁻¹ (1 - α) Σ_between), Σ_α the Ledoit-Wolf shrunk feature covariance;
- ``leep`` (Nguyen et al. 2020, "LEEP: A New Measure to Evaluate Transferability of Learned
  Representations") and ``nce`` (Tran et al. 2019, "Transferability and Hardness of Supervised
  Classification Tasks") need the source model's class probabilities on the shots (a source head);
- ``loo_prototype``: leave-one-out accuracy of the cosine nearest-prototype classifier on the shots
  (undefined, NaN, with one shot of a class: its prototype would be the held-out image itself);
- ``pool_im``: the one score that also reads the target's unlabelled images (``pool``): how confidently
  and evenly the shots' cosine prototypes, refined on the pool, split them (information maximisation).
  Every other score is fitted to the shots alone, and with one shot per class those cannot tell class
  structure from the embedding's width (benchmarks/recommend.py); this one still can.
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax


def _svd(F: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (U, s, Vt) of F over its non-zero singular values, from the eigendecomposition of the
    smaller Gram matrix (n x n or d x d): several times faster than LAPACK's SVD at these shapes."""
    n, d = F.shape
    if n <= d:
        lam, u = np.linalg.eigh(F @ F.T)
        keep = lam > max(lam.max(), 0.0) * 1e-12
        s = np.sqrt(lam[keep])
        u = u[:, keep]
        return u, s, (F.T @ u / s).T
    lam, v = np.linalg.eigh(F.T @ F)
    keep = lam > max(lam.max(), 0.0) * 1e-12
    s = np.sqrt(lam[keep])
    v = v[:, keep]
    return F @ v / s, s, v.T


def log_evidence(F: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """ln p(y | F, α, β) of Bayesian linear regression y = F m + noise, m ~ N(0, α⁻¹ I), noise ~
    N(0, β⁻¹ I) (Bishop 2006, eq. 3.86): the quantity LogME maximises, for one target column."""
    F, y = np.asarray(F, np.float64), np.asarray(y, np.float64)
    n, d = F.shape
    u, s, _ = _svd(F)
    return _evidence(s * s, u.T @ y, float(y @ y), n, d, alpha, beta)


def _evidence(s2, z, y2, n, d, alpha, beta) -> float:
    t = alpha + beta * s2
    m2 = float(((beta * np.sqrt(s2) * z / t) ** 2).sum())
    res2 = float(((alpha * z / t) ** 2).sum() + max(y2 - float(z @ z), 0.0))
    logdet = float(np.log(t).sum() + (d - len(s2)) * np.log(alpha))
    return (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
            - beta / 2 * res2 - alpha / 2 * m2 - logdet / 2)


def _logme_columns(s2, z, y2, n, d, iterations: int = 100, tol: float = 1e-5) -> np.ndarray:
    """Maximised evidence of each target column (z: r x C, y2: C), by the fixed-point updates of You
    et al. 2021 (MacKay's evidence approximation): γ = Σ βσ²/(α + βσ²), α = γ / mᵀm,
    β = (n - γ) / ‖Fm - y‖², for every column at once until each ratio α/β settles."""
    C = z.shape[1]
    alpha, beta = np.ones(C), np.ones(C)
    s2c = s2[:, None]
    out2 = np.maximum(y2 - (z * z).sum(0), 0.0)  # the part of each column outside F's span
    for _ in range(iterations):
        t = alpha + beta * s2c
        gamma = (beta * s2c / t).sum(0)
        m2 = ((beta * np.sqrt(s2c) * z / t) ** 2).sum(0)
        res2 = ((alpha * z / t) ** 2).sum(0) + out2
        new_alpha, new_beta = gamma / np.maximum(m2, 1e-12), np.maximum(n - gamma, 1e-12) / np.maximum(res2, 1e-12)
        done = np.abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < tol
        alpha, beta = new_alpha, new_beta
        if done.all():
            break
    return np.array([_evidence(s2, z[:, j], float(y2[j]), n, d, alpha[j], beta[j]) for j in range(C)])


def logme(F: np.ndarray, y: np.ndarray) -> float:
    """LogME: the maximised log evidence per sample, averaged over the one-hot columns of ``y``."""
    F = np.asarray(F, np.float64)
    n, d = F.shape
    u, s, _ = _svd(F)
    y = np.asarray(y)
    onehot = (y[:, None] == np.unique(y)[None, :]).astype(np.float64)
    return float(np.mean(_logme_columns(s * s, u.T @ onehot, (onehot * onehot).sum(0), n, d) / n))


def h_score(F: np.ndarray, y: np.ndarray, shrinkage: float | str = "auto") -> float:
    """H-score tr(Σ⁻¹ Σ_between) with shrinkage α: Σ_α = (1 - α) S + α (tr S / d) I and the between-class
    covariance scaled by (1 - α) (Ibrahim et al. 2022); ``auto``: α by Ledoit & Wolf 2004; 0: Bao et
    al.'s definition (pseudo-inverse of the sample covariance). Computed in the span of the n samples
    (their SVD), where the class means also lie, instead of inverting a d x d matrix."""
    F = np.asarray(F, np.float64)
    F = F - F.mean(0)
    n, d = F.shape
    if shrinkage == "auto":
        from sklearn.covariance import ledoit_wolf_shrinkage

        a = float(ledoit_wolf_shrinkage(F, assume_centered=True))
    else:
        a = float(shrinkage)
    _, s, vt = _svd(F)
    lam = (1 - a) * s * s / n + a * float((s * s).sum()) / n / d  # eigenvalues of Σ_α in the samples' span
    keep = lam > lam.max() * 1e-10
    y = np.asarray(y)
    means = {c: F[y == c].mean(0) for c in np.unique(y)}
    gv = np.stack([means[c] for c in y]) @ vt[keep].T
    return float((1 - a) / n * ((gv * gv) / lam[keep]).sum())


def leep(source_probs: np.ndarray, y: np.ndarray) -> float:
    """LEEP: mean log of the expected empirical prediction Σ_z P(y|z) θ(x)_z, with P(y|z) from the
    empirical joint of target labels and the source model's soft predictions θ over source classes z."""
    p = np.asarray(source_probs, np.float64)
    y = np.asarray(y)
    classes = np.unique(y)
    joint = np.stack([p[y == c].sum(0) for c in classes]) / len(y)  # C x Z
    cond = joint / np.maximum(joint.sum(0, keepdims=True), 1e-300)  # P(y | z)
    eep = (p @ cond.T)[np.arange(len(y)), np.searchsorted(classes, y)]
    return float(np.mean(np.log(np.maximum(eep, 1e-300))))


def nce(source_probs: np.ndarray, y: np.ndarray) -> float:
    """NCE: -H(Y | Z), the negative conditional entropy of the target labels given the source model's
    hard predictions z = argmax θ(x)."""
    z = np.asarray(source_probs).argmax(1)
    y = np.asarray(y)
    n = len(y)
    total = 0.0
    for zz in np.unique(z):
        ys = y[z == zz]
        pz = len(ys) / n
        _, counts = np.unique(ys, return_counts=True)
        q = counts / len(ys)
        total += pz * float((q * np.log(q)).sum())
    return float(total)


def loo_prototype(F: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out accuracy of the cosine nearest-prototype classifier (SimpleShot's L2-normalised
    form); NaN when a class has a single shot."""
    F = np.asarray(F, np.float64)
    F = F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-12)
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < 2:
        return float("nan")
    sums = np.stack([F[y == c].sum(0) for c in classes])
    idx = np.searchsorted(classes, y)
    # cosine needs only directions: a class mean and a class sum point the same way
    cos = F @ (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).T
    own = sums[idx] - F  # the held-out image's own class without it
    cos[np.arange(len(y)), idx] = (F * own).sum(1) / np.maximum(np.linalg.norm(own, axis=1), 1e-12)
    return float(np.mean(cos.argmax(1) == idx))


#: the temperature of pool_im's cosine logits; chosen among 5, 10, 20, 30 and 50 on benchmarks/recommend
#: (10 and below rank the candidates worse there; 20-50 alike): a choice made on that benchmark's candidates
POOL_TEMPERATURE = 20.0
#: soft k-means steps that move pool_im's prototypes onto the pool. One shot per class is one image: an
#: atypical draw puts its prototype off its class's cluster; unrefined, the score ranked the ResNet-18's
#: last stage (32.8 %) first at mnistm 1-shot on 2 of 10 draws, against the best candidate's 60.4 %.
#: With 3, 5 or 10 steps each of the 10 draws picked the best on both targets, 1 or 2 steps did not
#: (``python -m benchmarks.pool_refine``, results/bench/pool_refine.md): a choice made on that benchmark.
#: Only where a class has a single shot: over 5 and 10 shots the averaged prototypes need no correction,
#: and refined ones follow whatever clusters an embedding has, class or not, which lowered
#: pool_im's weighted tau there from 0.76-0.77 to 0.63-0.73 (``python -m benchmarks.recommend``, 2026-12-05)
POOL_REFINE = 5


def pool_im(F: np.ndarray, y: np.ndarray, pool: np.ndarray, temperature: float = POOL_TEMPERATURE,
            refine: int | None = None) -> float:
    """Information maximisation of the shots' cosine prototypes on unlabelled target images: (H(mean
    p) - mean H(p)) / ln C over the pool's predictions p = softmax(temperature · cos(x, prototype)),
    in [-1, 1]: high when the pool falls confidently and evenly into the classes the shots define.
    The objective of SHOT (Liang et al. 2020, "Do We Really Need to Access the Source Data?") and the
    label-free selection rule of tl's adaptation runs, here on the prototype classifier of SimpleShot
    (Wang et al. 2019: features centred, on the pool's mean here, and L2-normalised). Before scoring,
    ``refine`` soft k-means steps move each prototype to the mean of its shots and of the pool weighted
    by p (Ren et al. 2018, "Meta-Learning for Semi-Supervised Few-Shot Classification"), so that one
    atypical shot does not decide how an embedding's clusters are read (None: ``POOL_REFINE`` steps
    where a class has a single shot, none otherwise). No pool label is read."""
    F, P = np.asarray(F, np.float64), np.asarray(pool, np.float64)
    mu = P.mean(0)

    def unit(X: np.ndarray) -> np.ndarray:
        X = X - mu
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    F, P = unit(F), unit(P)
    y = np.asarray(y)
    classes = np.unique(y)
    sums = np.stack([F[y == c].sum(0) for c in classes])
    counts = np.array([(y == c).sum() for c in classes], np.float64)
    protos = sums / counts[:, None]
    if refine is None:
        refine = POOL_REFINE if counts.min() == 1 else 0

    def predict(protos: np.ndarray) -> np.ndarray:
        return softmax(temperature * P @ (protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True),
                                                              1e-12)).T, axis=1)

    for _ in range(refine):
        p = predict(protos)
        protos = (sums + p.T @ P) / (counts + p.sum(0))[:, None]
    return information_maximization(predict(protos)) / float(np.log(len(classes)))


def information_maximization(p: np.ndarray, eps: float = 1e-8) -> float:
    """IM = H(E[p]) − E[H(p)] of class probabilities ``p`` (n x C): the mutual information between
    inputs and predicted classes (Shi & Sha 2012; the objective of SHOT, Liang et al. 2020). High when
    each prediction is confident and the classes are used evenly; collapsed or unsure predictions score low."""
    p = np.asarray(p, np.float64)
    mean = p.mean(0)
    return float(-(mean * np.log(mean + eps)).sum() + (p * np.log(p + eps)).sum(1).mean())


#: every score by name: fitted to the shots alone, then on the unlabelled pool, then from source probabilities
FEATURE_SCORES = {"logme": logme, "h_score": h_score, "loo_prototype": loo_prototype}
POOL_SCORES = {"pool_im": pool_im}
SOURCE_SCORES = {"leep": leep, "nce": nce}
SCORES = (*FEATURE_SCORES, *POOL_SCORES, *SOURCE_SCORES)
#: fitted to the shots' features alone: with one shot per class they favour the widest embedding
SHOT_FITTED = ("logme", "h_score")


def all_scores(F: np.ndarray, y: np.ndarray, source_probs: np.ndarray | None = None,
               pool: np.ndarray | None = None, names: tuple[str, ...] = SCORES) -> dict[str, float]:
    """The scores ``names`` (default every one) of one candidate (LEEP and NCE NaN without source
    probabilities, pool_im NaN without unlabelled images)."""
    out = {name: fn(F, y) for name, fn in FEATURE_SCORES.items() if name in names}
    for name, fn in POOL_SCORES.items():
        if name in names:
            out[name] = fn(F, y, pool) if pool is not None and len(pool) else float("nan")
    for name, fn in SOURCE_SCORES.items():
        if name in names:
            out[name] = fn(source_probs, y) if source_probs is not None else float("nan")
    return out
