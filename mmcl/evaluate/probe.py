"""Linear probes: how much of a label (or latent factor) a frozen representation holds.

    probe = fit_probe(x_train, y_train, "classification")   # or "regression"
    score(probe, x_test, y_test)    -> {"accuracy", "balanced_accuracy"} | {"r2"}
    score_all(probe, x_test, y_test) -> + "macro_f1" | {"mse", "mae", "r2"}
    linear_probe(train, val, test, task)      the protocol mmcl reports: L2 chosen on val,
                                              refit on train+val, scored on test
    few_label_probe(train, val, test, ks, seeds)   the same with k labelled rows per class

Features are standardised with the training mean/std; classification is multinomial logistic
regression, regression is ridge regression, both with an L2 penalty `l2 * ||W||^2` (bias not
penalised), in float64 on the CPU, so a fit is deterministic: logistic regression is fitted
full batch with L-BFGS (strong Wolfe line search, exact gradients without an autograd graph),
ridge regression is solved in closed form. Accuracy and balanced accuracy are both reported
because the papers differ (CoMM: balanced accuracy; FactorCL: accuracy); macro-F1 beside
them. `select_l2` picks the penalty on a validation split (CoMM's protocol); `linear_probe`
does that, then refits on train+val and scores on test (what `mmcl eval` reports).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ProbeTask = Literal["classification", "regression"]
DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Probes on fewer feature values than this (rows x features) run on one torch thread.
ONE_THREAD_VALUES = 1 << 23


@contextmanager
def probe_threads(rows: int, features: int) -> Iterator[int]:
    """Torch's intra-op threads while probing: one for a probe-sized problem (below
    ONE_THREAD_VALUES feature values), torch's own count above. A probe is thousands of
    small ops (L-BFGS: a few dot products and a (rows, features) @ (features, heads) product
    per step); with several threads each op is a fork-join, and on a machine busy with
    other work every join waits for a descheduled thread: the demo's 8 columns x 6 L2
    strengths took 72 s on 2 threads at load 10 and 4 s on one, for the same fit. Restores
    the count on exit; yields the count used."""
    before = torch.get_num_threads()
    threads = 1 if int(rows) * int(features) < ONE_THREAD_VALUES else before
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@dataclass
class Probe:
    """A fitted linear probe: standardisation, then `x @ weight + bias`."""

    task: ProbeTask
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor        # (D, C) for classification, (D, K) for regression
    bias: torch.Tensor
    num_classes: int | None = None
    l2: float = 0.0
    converged_loss: float = float("nan")

    def decision(self, x) -> torch.Tensor:
        """Logits (classification) or predictions (regression, (N, K))."""
        z = (_features(x) - self.mean) / self.std
        return z @ self.weight + self.bias

    def predict(self, x) -> np.ndarray:
        out = self.decision(x)
        if self.task == "classification":
            return out.argmax(dim=1).numpy()
        return out.numpy() if out.shape[1] > 1 else out[:, 0].numpy()


def _features(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach()
    t = t.to(device="cpu", dtype=torch.float64)
    if t.ndim != 2:
        t = t.reshape(len(t), -1)
    if not torch.isfinite(t).all():
        raise ValueError("probe features contain NaN or inf")
    return t


def _targets(y, task: ProbeTask, n: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y).detach().cpu()
    if len(t) != n:
        raise ValueError(f"probe: {n} feature rows but {len(t)} targets")
    if task == "classification":
        if t.ndim != 1 or t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError("classification targets must be a 1-D array of class indices")
        return t.long()
    t = t.to(torch.float64)
    return t[:, None] if t.ndim == 1 else t


def fit_probe(x, y, task: ProbeTask, num_classes: int | None = None, l2: float = 1e-4,
              max_iter: int = 100, init: Probe | None = None) -> Probe:
    """Fit a linear probe on features x (N, D) and targets y (N,) (regression also (N, K)).

    Regression (ridge) is solved exactly: on standardised features the minimiser of
    0.5 * mean ||z W + b - y||^2 + l2 ||W||^2 is b = mean(y), W = (Z'Z/N + 2 l2 I)^-1 Z'(y -
    mean(y))/N. Classification runs L-BFGS from zero, or from `init` (a probe fitted on the
    same features, e.g. the previous L2 of a grid: a warm start that only saves iterations)."""
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    xs = _features(x)
    yt = _targets(y, task, len(xs))
    if len(xs) == 0:
        raise ValueError("probe: no training rows")
    mean = xs.mean(dim=0)
    std = xs.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    z = (xs - mean) / std
    if task == "classification":
        num_classes = int(num_classes if num_classes is not None else max(2, int(yt.max()) + 1))
        if yt.min() < 0 or yt.max() >= num_classes:
            raise ValueError(f"class indices must be in 0..{num_classes - 1}")
        outputs = num_classes
    else:
        num_classes, outputs = None, yt.shape[1]
    if task == "regression":
        n, d = z.shape
        centred = yt - yt.mean(dim=0)
        gram = z.T @ z / n + 2.0 * float(l2) * torch.eye(d, dtype=torch.float64)
        rhs = z.T @ centred / n
        try:
            w = torch.linalg.solve(gram, rhs)
        except RuntimeError:  # singular (l2 = 0 and collinear features): least norm
            w = torch.linalg.pinv(gram) @ rhs
        b = yt.mean(dim=0)
        final = float(0.5 * ((z @ w + b - yt) ** 2).sum(dim=1).mean() + l2 * (w ** 2).sum())
        return Probe(task, mean, std, w, b, None, float(l2), final)
    weight = torch.zeros(z.shape[1], outputs, dtype=torch.float64)
    bias = torch.zeros(outputs, dtype=torch.float64)
    if init is not None and init.task == task and tuple(init.weight.shape) == \
            tuple(weight.shape) and torch.equal(init.mean, mean) and torch.equal(init.std, std):
        weight.copy_(init.weight)
        bias.copy_(init.bias)
    onehot = F.one_hot(yt, outputs).to(torch.float64)
    n = len(z)

    def objective() -> torch.Tensor:
        """Mean cross-entropy + l2 ||W||^2, and its exact gradient put into .grad (no
        autograd graph: on small probes the graph costs more than the arithmetic)."""
        logp = torch.log_softmax(z @ weight + bias, dim=1)
        loss = -(logp * onehot).sum() / n + l2 * (weight ** 2).sum()
        g = (logp.exp() - onehot) / n
        weight.grad = z.T @ g + (2.0 * l2) * weight
        bias.grad = g.sum(dim=0)
        return loss

    final = minimise_lbfgs(weight, bias, objective, max_iter)
    return Probe(task, mean, std, weight.detach().clone(), bias.detach().clone(), num_classes,
                 float(l2), final)



def _standardiser(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = xs.mean(dim=0)
    std = xs.std(dim=0, unbiased=False)
    return mean, torch.where(std > 1e-12, std, torch.ones_like(std))


def _restandardised(probe: Probe, mean: torch.Tensor, std: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) giving exactly `probe`'s logits on features standardised with another
    mean/std: a warm start for a refit on more rows."""
    scale = (std / probe.std)[:, None]
    weight = probe.weight * scale
    bias = probe.bias + ((mean - probe.mean) / probe.std) @ probe.weight
    return weight, bias


def fit_logistic_heads(x, targets: Sequence, num_classes: Sequence[int],
                       l2s: Sequence[float], max_iter: int = 100,
                       init: Sequence[Probe | None] | None = None) -> list[Probe]:
    """Several logistic probes on the same features in ONE L-BFGS run: head h predicts
    targets[h] (N,) with num_classes[h] classes under penalty l2s[h]. The joint objective is
    the sum of the heads' own objectives, which share no parameter, so its minimiser is every
    head's own minimiser (each strictly convex for l2 > 0); one run costs about what one head
    costs, since the per-iteration work on probe-sized problems is overhead, not arithmetic.
    Used for the L2 grid (one head per strength) and for the columns sharing features.
    `init[h]`: a probe of the same head on other rows (e.g. the grid's choice before the refit
    on train+val), mapped exactly onto these rows' standardisation."""
    xs = _features(x)
    n = len(xs)
    if n == 0:
        raise ValueError("probe: no training rows")
    if not (len(targets) == len(num_classes) == len(l2s)) or not targets:
        raise ValueError("fit_logistic_heads: one target, class count and l2 per head")
    mean, std = _standardiser(xs)
    z = (xs - mean) / std
    sizes = [int(c) for c in num_classes]
    d = z.shape[1]
    # Two-class heads are one logit each: softmax over (W0, W1) depends on W1 - W0 only, and
    # for a given difference w the penalty l2 (|W0|^2 + |W1|^2) is least at W0 = -W1 = w/2,
    # so the two-class optimum is the logistic one with penalty (l2 / 2) |w|^2, mapped back
    # as (-w/2, w/2) below: the same probe for half the arithmetic and no log_softmax.
    binary = [h for h, c in enumerate(sizes) if c == 2]
    multi = [h for h, c in enumerate(sizes) if c != 2]
    yts = []
    for y, c in zip(targets, sizes):
        yt = _targets(y, "classification", n)
        if yt.min() < 0 or yt.max() >= c:
            raise ValueError(f"class indices must be in 0..{c - 1}")
        yts.append(yt)
    starts = [None] * len(sizes)
    for h, start in enumerate(init or []):
        if start is not None and tuple(start.weight.shape) == (d, sizes[h]):
            starts[h] = _restandardised(start, mean, std)
    params, parts = [], []
    if binary:
        target = torch.stack([yts[h] for h in binary], dim=1).to(torch.float64)   # (N, Hb)
        l2_b = torch.tensor([[float(l2s[h]) / 2.0 for h in binary]], dtype=torch.float64)
        w_b = torch.zeros(d, len(binary), dtype=torch.float64)
        b_b = torch.zeros(len(binary), dtype=torch.float64)
        for j, h in enumerate(binary):
            if starts[h] is not None:
                w0, b0 = starts[h]
                w_b[:, j] = w0[:, 1] - w0[:, 0]
                b_b[j] = b0[1] - b0[0]
        params += [w_b, b_b]
    if multi:
        m_sizes = [sizes[h] for h in multi]
        offsets = np.concatenate([[0], np.cumsum(m_sizes)]).astype(int)
        onehot = torch.zeros(n, int(offsets[-1]), dtype=torch.float64)
        l2_cols = torch.zeros(1, int(offsets[-1]), dtype=torch.float64)
        w_m = torch.zeros(d, int(offsets[-1]), dtype=torch.float64)
        b_m = torch.zeros(int(offsets[-1]), dtype=torch.float64)
        for j, h in enumerate(multi):
            lo, hi = int(offsets[j]), int(offsets[j + 1])
            onehot[:, lo:hi] = F.one_hot(yts[h], sizes[h]).to(torch.float64)
            l2_cols[0, lo:hi] = float(l2s[h])
            if starts[h] is not None:
                w_m[:, lo:hi], b_m[lo:hi] = starts[h]
        # heads with the same class count are one (N, H, C) block: one log_softmax per block
        blocks: list[tuple[int, int, int]] = []     # (start, heads, classes), contiguous
        for j, c in enumerate(m_sizes):
            if blocks and blocks[-1][2] == c and \
                    blocks[-1][0] + blocks[-1][1] * c == offsets[j]:
                blocks[-1] = (blocks[-1][0], blocks[-1][1] + 1, c)
            else:
                blocks.append((int(offsets[j]), 1, c))
        params += [w_m, b_m]

    def log_probs(logits: torch.Tensor) -> torch.Tensor:
        parts = [logits[:, s:s + k * c].reshape(n, k, c).log_softmax(dim=2).reshape(n, k * c)
                 for s, k, c in blocks]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def objective() -> torch.Tensor:
        """Sum over heads of mean cross-entropy + penalty, exact gradient in .grad."""
        loss = torch.zeros((), dtype=torch.float64)
        if binary:
            logit = z @ w_b + b_b
            # -log p(y) = softplus(s) - y s
            loss = loss + (F.softplus(logit) - target * logit).sum() / n \
                + (l2_b * w_b ** 2).sum()
            g = (torch.sigmoid(logit) - target) / n
            w_b.grad = z.T @ g + 2.0 * l2_b * w_b
            b_b.grad = g.sum(dim=0)
        if multi:
            logp = log_probs(z @ w_m + b_m)
            loss = loss - (logp * onehot).sum() / n + (l2_cols * w_m ** 2).sum()
            g = (logp.exp() - onehot) / n
            w_m.grad = z.T @ g + 2.0 * l2_cols * w_m
            b_m.grad = g.sum(dim=0)
        return loss

    final = _run_lbfgs(params, objective, max_iter)
    out: list[Probe | None] = [None] * len(sizes)
    for j, h in enumerate(binary):
        w, b = w_b[:, j].detach().clone(), b_b[j].detach().clone()
        out[h] = Probe("classification", mean, std, torch.stack([-w / 2, w / 2], dim=1),
                       torch.stack([-b / 2, b / 2]), 2, float(l2s[h]), final)
    for j, h in enumerate(multi):
        lo, hi = int(offsets[j]), int(offsets[j + 1])
        out[h] = Probe("classification", mean, std, w_m[:, lo:hi].detach().clone(),
                       b_m[lo:hi].detach().clone(), sizes[h], float(l2s[h]), final)
    return out


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in y_true (macro accuracy)."""
    classes = np.unique(y_true)
    return float(np.mean([(y_pred[y_true == c] == c).mean() for c in classes]))


def score(probe: Probe, x, y) -> dict[str, float]:
    """Classification: {"accuracy", "balanced_accuracy"}; regression: {"r2"} (averaged over
    outputs for multi-output targets)."""
    if probe.task == "classification":
        yt = _targets(y, "classification", len(_features(x))).numpy()
        pred = probe.predict(x)
        return {"accuracy": float((pred == yt).mean()),
                "balanced_accuracy": balanced_accuracy(yt, pred)}
    yt = _targets(y, "regression", len(_features(x)))
    pred = probe.decision(x)
    ss_res = ((yt - pred) ** 2).sum(dim=0)
    ss_tot = ((yt - yt.mean(dim=0)) ** 2).sum(dim=0).clamp_min(1e-12)
    return {"r2": float((1 - ss_res / ss_tot).mean())}


def select_l2(x_train, y_train, x_val, y_val, task: ProbeTask, num_classes: int | None = None,
              grid: Sequence[float] = DEFAULT_L2_GRID, max_iter: int = 100) -> Probe:
    """The probe whose L2 strength in `grid` scores best on the validation split (balanced
    accuracy for classification, R² for regression); ties go to the stronger penalty."""
    metric = "balanced_accuracy" if task == "classification" else "r2"
    best, best_score = None, -np.inf
    for l2 in sorted(grid, reverse=True):
        probe = fit_probe(x_train, y_train, task, num_classes, l2, max_iter)
        value = score(probe, x_val, y_val)[metric]
        if value > best_score:
            best, best_score = probe, value
    return best


def few_label_subset(labels, per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most `per_class` randomly chosen rows of each class (all rows of
    a class with fewer), seeded: the few-label probing protocol."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError("labels must be 1-D")
    if per_class < 1:
        raise ValueError("per_class must be >= 1")
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c),
                        size=min(per_class, int((labels == c).sum())), replace=False)
             for c in np.unique(labels)]
    return np.sort(np.concatenate(picks)).astype(np.int64) if picks else np.zeros(0, np.int64)


# ------------------------------------------------------------------- all the metrics


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean F1 over the classes present in y_true or y_pred (sklearn's
    `f1_score(average="macro")`; a class never predicted and never present is not counted,
    a class with no true positives scores 0)."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} targets but {len(y_pred)} predictions")
    if len(y_true) == 0:
        return float("nan")
    scores = []
    for c in np.union1d(np.unique(y_true), np.unique(y_pred)):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        fp = int(((y_pred == c) & (y_true != c)).sum())
        fn = int(((y_pred != c) & (y_true == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def classification_metrics(y_true, y_pred) -> dict[str, float]:
    """{"accuracy", "balanced_accuracy", "macro_f1"} of predicted class indices."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} targets but {len(y_pred)} predictions")
    if len(y_true) == 0:
        return {"accuracy": float("nan"), "balanced_accuracy": float("nan"),
                "macro_f1": float("nan")}
    return {"accuracy": float((y_true == y_pred).mean()),
            "balanced_accuracy": balanced_accuracy(y_true, y_pred),
            "macro_f1": macro_f1(y_true, y_pred)}


def regression_metrics(y_true, y_pred) -> dict[str, float]:
    """{"mse", "mae", "r2"}; for multi-output targets (N, K) each is averaged over outputs.
    R² = 1 - SS_res / SS_tot against the mean of y_true (0 for a constant prediction at the
    mean, negative when worse)."""
    yt = np.asarray(y_true, dtype=np.float64)
    yp = np.asarray(y_pred, dtype=np.float64)
    yt = yt[:, None] if yt.ndim == 1 else yt
    yp = yp[:, None] if yp.ndim == 1 else yp
    if yt.shape != yp.shape:
        raise ValueError(f"targets {yt.shape} and predictions {yp.shape} differ in shape")
    if len(yt) == 0:
        return {"mse": float("nan"), "mae": float("nan"), "r2": float("nan")}
    err = yp - yt
    ss_tot = np.maximum(((yt - yt.mean(axis=0)) ** 2).sum(axis=0), 1e-12)
    return {"mse": float((err ** 2).mean()), "mae": float(np.abs(err).mean()),
            "r2": float((1 - (err ** 2).sum(axis=0) / ss_tot).mean())}


def score_all(probe: Probe, x, y) -> dict[str, float]:
    """Every metric mmcl reports: accuracy, balanced accuracy and macro-F1 (classification);
    MSE, MAE and R² (regression)."""
    if probe.task == "classification":
        yt = _targets(y, "classification", len(_features(x))).numpy()
        return classification_metrics(yt, probe.predict(x))
    yt = _targets(y, "regression", len(_features(x))).numpy()
    return regression_metrics(yt, probe.decision(x).numpy())


def selection_metric(task: str) -> str:
    """The validation metric the L2 is chosen on."""
    return {"classification": "balanced_accuracy", "multilabel": "macro_f1"}.get(task, "r2")


# ------------------------------------------------------------------------ the protocol


@dataclass
class ProbeResult:
    """One probe run under mmcl's protocol."""

    metrics: dict[str, float]                 # on the test split
    l2: float                                 # chosen on the validation split
    val_scores: dict[float, float] = field(default_factory=dict)  # l2 -> validation metric
    train_rows: int = 0                       # rows of the refit (train + val)

    def to_dict(self) -> dict:
        return {**self.metrics, "l2": self.l2, "train_rows": self.train_rows,
                "val_score_by_l2": {f"{k:g}": v for k, v in self.val_scores.items()}}


def _cat(a, b) -> np.ndarray:
    return np.concatenate([np.asarray(a), np.asarray(b)])


def linear_probe(x_train, y_train, x_val, y_val, x_test, y_test, task: ProbeTask,
                 num_classes: int | None = None, grid: Sequence[float] = DEFAULT_L2_GRID,
                 max_iter: int = 100) -> ProbeResult:
    """mmcl's probe protocol: for every L2 strength in `grid`, fit on train and score on val
    (balanced accuracy / R²; ties go to the stronger penalty); refit with the chosen L2 on
    train+val (standardised with their joint statistics); report every metric on test."""
    return linear_probes(x_train, {"_": y_train}, x_val, {"_": y_val}, x_test, {"_": y_test},
                         task, {"_": num_classes}, grid, max_iter)["_"]


def _choose_l2(val_scores: dict[float, float], grid: Sequence[float]) -> float:
    """The best validation score, ties to the stronger penalty; every score NaN (e.g. an
    empty val split): the middle of the grid."""
    best_l2, best = None, -np.inf
    for l2 in sorted(grid, reverse=True):
        if val_scores[float(l2)] > best:
            best_l2, best = float(l2), val_scores[float(l2)]
    return best_l2 if best_l2 is not None else float(sorted(grid)[len(grid) // 2])


def linear_probes(x_train, ys_train: dict, x_val, ys_val: dict, x_test, ys_test: dict,
                  task: ProbeTask, num_classes: dict | None = None,
                  grid: Sequence[float] = DEFAULT_L2_GRID,
                  max_iter: int = 100) -> dict[str, ProbeResult]:
    """`linear_probe` of several target columns ({name: y}) on the same features. For
    classification every column x L2 strength is one head of one joint fit on train
    (`fit_logistic_heads`), then one joint refit on train+val of every column at its chosen
    L2, warm-started from the grid's fit: two L-BFGS runs instead of (grid + 1) per column.
    Ridge is exact per strength."""
    names = list(ys_train)
    grid = sorted(float(v) for v in grid)
    metric = selection_metric(task)
    fit_x, fit_y = _cat(x_train, x_val), {c: _cat(ys_train[c], ys_val[c]) for c in names}
    classes = {}
    if task == "classification":
        for c in names:
            given = (num_classes or {}).get(c)
            classes[c] = int(given) if given is not None else max(2, int(max(
                np.max(ys_train[c]), np.max(ys_val[c]), np.max(ys_test[c]))) + 1)
        heads = [(c, l2) for c in names for l2 in grid]
        fitted = dict(zip(heads, fit_logistic_heads(
            x_train, [ys_train[c] for c, _ in heads], [classes[c] for c, _ in heads],
            [l2 for _, l2 in heads], max_iter)))
    else:
        fitted = {(c, l2): fit_probe(x_train, ys_train[c], task, None, l2, max_iter)
                  for c in names for l2 in grid}
    val_scores = {c: {l2: score_all(fitted[c, l2], x_val, ys_val[c])[metric] for l2 in grid}
                  for c in names}
    chosen = {c: _choose_l2(val_scores[c], grid) for c in names}
    if task == "classification":
        finals = dict(zip(names, fit_logistic_heads(
            fit_x, [fit_y[c] for c in names], [classes[c] for c in names],
            [chosen[c] for c in names], max_iter, init=[fitted[c, chosen[c]] for c in names])))
    else:
        finals = {c: fit_probe(fit_x, fit_y[c], task, None, chosen[c], max_iter)
                  for c in names}
    rows = len(x_train) + len(x_val)
    return {c: ProbeResult(score_all(finals[c], x_test, ys_test[c]), chosen[c],
                           dict(sorted(val_scores[c].items())), rows) for c in names}


def few_label_probe(x_train, y_train, x_val, y_val, x_test, y_test, ks: Sequence[int],
                    seeds: Sequence[int], num_classes: int | None = None,
                    grid: Sequence[float] = DEFAULT_L2_GRID,
                    max_iter: int = 100) -> dict[int, dict[str, dict[str, float]]]:
    """The few-label regime (classification): for each k and seed, k labelled rows per class
    from train and k per class from val (`few_label_subset`, seeded), then `linear_probe` on
    those (L2 chosen on the k-per-class val rows, refit on both) and scored on the whole test
    split. Returns {k: {metric: {"mean", "std", "n"}}} over the seeds."""
    y_train, y_val = np.asarray(y_train), np.asarray(y_val)
    x_train, x_val = np.asarray(x_train), np.asarray(x_val)
    if num_classes is None:
        num_classes = max(2, int(max(y_train.max(), y_val.max(), np.max(y_test))) + 1)
    out: dict[int, dict[str, dict[str, float]]] = {}
    for k in ks:
        runs: list[dict[str, float]] = []
        for seed in seeds:
            tr = few_label_subset(y_train, int(k), seed=int(seed))
            va = few_label_subset(y_val, int(k), seed=int(seed) + 7919)
            res = linear_probe(x_train[tr], y_train[tr], x_val[va], y_val[va], x_test, y_test,
                               "classification", num_classes, grid, max_iter)
            runs.append(res.metrics)
        out[int(k)] = {m: mean_std([r[m] for r in runs]) for m in runs[0]}
    return out


def fit_subset_heads(x, rows: Sequence[np.ndarray], targets: Sequence, num_classes:
                     Sequence[int], l2s: Sequence[Sequence[float]], max_iter: int = 100,
                     init: Sequence[Probe | None] | None = None) -> list[list[Probe]]:
    """Logistic heads that each see their own rows of one feature matrix, fitted in ONE
    L-BFGS run: head h is fitted on x[rows[h]] against targets[h] with that subset's own
    standardisation, once per penalty in l2s[h], exactly as `fit_probe` fits it alone (the
    joint objective is the sum of the heads' objectives, which share no parameter). Heads
    with the same class count are one padded batch, (heads, rows, D) @ (heads, D, L x C),
    so the few-label protocol's many small draws cost about one fit instead of a Python-level
    L-BFGS per draw. `init[h]`: a probe of head h on other rows (all its penalties start
    there). Returns, per head, one Probe per penalty."""
    xs = _features(x)
    heads = len(rows)
    if not (heads == len(targets) == len(num_classes) == len(l2s)) or not heads:
        raise ValueError("fit_subset_heads: rows, targets, class count and l2s per head")
    d = xs.shape[1]
    stats, groups = [], {}
    for h in range(heads):
        r = torch.from_numpy(np.asarray(rows[h], dtype=np.int64))
        if len(r) == 0:
            raise ValueError("probe: a head without training rows")
        mean, std = _standardiser(xs[r])
        stats.append((mean, std))
        groups.setdefault((int(num_classes[h]), len(l2s[h])), []).append(h)
    params, blocks = [], []
    for (c, n_l2), members in groups.items():
        n_max = max(len(rows[h]) for h in members)
        z = torch.zeros(len(members), n_max, d, dtype=torch.float64)
        onehot = torch.zeros(len(members), n_max, 1, c, dtype=torch.float64)
        row_weight = torch.zeros(len(members), n_max, 1, 1, dtype=torch.float64)
        l2 = torch.tensor([[list(map(float, l2s[h]))] for h in members],
                          dtype=torch.float64)[:, :, :, None]          # (G, 1, L, 1)
        weight = torch.zeros(len(members), d, n_l2, c, dtype=torch.float64)
        bias = torch.zeros(len(members), 1, n_l2, c, dtype=torch.float64)
        for g, h in enumerate(members):
            r = torch.from_numpy(np.asarray(rows[h], dtype=np.int64))
            yt = _targets(targets[h], "classification", len(r))
            if yt.min() < 0 or yt.max() >= c:
                raise ValueError(f"class indices must be in 0..{c - 1}")
            z[g, :len(r)] = (xs[r] - stats[h][0]) / stats[h][1]
            onehot[g, :len(r), 0] = F.one_hot(yt, c).to(torch.float64)
            row_weight[g, :len(r)] = 1.0 / len(r)
            start = (init or [None] * heads)[h]
            if start is not None and tuple(start.weight.shape) == (d, c):
                w0, b0 = _restandardised(start, *stats[h])
                weight[g] = w0[:, None, :]
                bias[g, 0] = b0[None, :]
        params += [weight, bias]
        blocks.append((members, z, onehot, row_weight, l2, weight, bias))

    def objective() -> torch.Tensor:
        """Sum over heads and penalties of mean cross-entropy + l2 ||W||^2; exact gradient
        in .grad (padded rows weigh 0)."""
        loss = torch.zeros((), dtype=torch.float64)
        for _, z, onehot, row_weight, l2, weight, bias in blocks:
            g_, n, (_, _, n_l2, c) = z.shape[0], z.shape[1], weight.shape
            logits = torch.bmm(z, weight.reshape(g_, d, n_l2 * c)).reshape(g_, n, n_l2, c)
            logp = torch.log_softmax(logits + bias, dim=3)
            loss = loss - (logp * onehot * row_weight).sum() + (l2 * weight ** 2).sum()
            grad = (logp.exp() - onehot) * row_weight
            weight.grad = torch.bmm(z.transpose(1, 2), grad.reshape(g_, n, n_l2 * c)) \
                .reshape(weight.shape) + 2.0 * l2 * weight
            bias.grad = grad.sum(dim=1, keepdim=True)
        return loss

    final = _run_lbfgs(params, objective, max_iter)
    out: list[list[Probe]] = [[] for _ in range(heads)]
    for members, _, _, _, _, weight, bias in blocks:
        for g, h in enumerate(members):
            out[h] = [Probe("classification", stats[h][0], stats[h][1],
                            weight[g, :, j].detach().clone(), bias[g, 0, j].detach().clone(),
                            int(num_classes[h]), float(l2s[h][j]), final)
                      for j in range(weight.shape[2])]
    return out


def few_label_probes(x_train, ys_train: dict, x_val, ys_val: dict, x_test, ys_test: dict,
                     ks: Sequence[int], seeds: Sequence[int], num_classes: dict | None = None,
                     grid: Sequence[float] = DEFAULT_L2_GRID, max_iter: int = 100
                     ) -> dict[str, dict[int, dict[str, dict[str, float]]]]:
    """`few_label_probe` of several classification columns ({name: y}) on the same features,
    with every draw (column x k x seed) and L2 strength one head of one joint fit on train
    (`fit_subset_heads`), then one joint refit of every draw on its train+val rows at its
    chosen L2, warm-started: two L-BFGS runs in all instead of 2 per column x k x seed.
    Same draws (`few_label_subset`, same seeds), same protocol, same figures up to the
    optimiser's tolerance. Returns {column: {k: {metric: {"mean", "std", "n"}}}}."""
    x_train, x_val = np.asarray(x_train), np.asarray(x_val)
    names = list(ys_train)
    grid = sorted(float(v) for v in grid)
    if not names or not ks or not seeds:
        return {c: {} for c in names}
    classes, draws = {}, []
    for c in names:
        y_tr, y_va = np.asarray(ys_train[c]), np.asarray(ys_val[c])
        given = (num_classes or {}).get(c)
        classes[c] = int(given) if given is not None else max(
            2, int(max(y_tr.max(), y_va.max(), np.max(ys_test[c]))) + 1)
        for k in ks:
            for seed in seeds:
                draws.append((c, int(k), few_label_subset(y_tr, int(k), seed=int(seed)),
                              few_label_subset(y_va, int(k), seed=int(seed) + 7919)))
    fitted = fit_subset_heads(
        x_train, [tr for _, _, tr, _ in draws],
        [np.asarray(ys_train[c])[tr] for c, _, tr, _ in draws],
        [classes[d[0]] for d in draws], [grid] * len(draws), max_iter)
    chosen = []
    for i, (c, _, _, va) in enumerate(draws):
        y_va = np.asarray(ys_val[c])[va]
        scores = {l2: score_all(p, x_val[va], y_va)["balanced_accuracy"]
                  for l2, p in zip(grid, fitted[i])}
        chosen.append(_choose_l2(scores, grid))
    fit_x = np.concatenate([x_train, x_val])
    offset = len(x_train)
    finals = [p[0] for p in fit_subset_heads(
        fit_x, [np.concatenate([tr, offset + va]) for _, _, tr, va in draws],
        [_cat(np.asarray(ys_train[c])[tr], np.asarray(ys_val[c])[va]) for c, _, tr, va in draws],
        [classes[d[0]] for d in draws], [[chosen[i]] for i in range(len(draws))], max_iter,
        init=[fitted[i][grid.index(chosen[i])] for i in range(len(draws))])]
    runs: dict[str, dict[int, list[dict[str, float]]]] = {c: {} for c in names}
    for (c, k, _, _), probe in zip(draws, finals):
        runs[c].setdefault(k, []).append(score_all(probe, x_test, ys_test[c]))
    return {c: {k: {m: mean_std([r[m] for r in rs]) for m in rs[0]} for k, rs in by_k.items()}
            for c, by_k in runs.items()}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "std" (sample std, ddof=1; 0 for one value), "n"} of finite values."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "n": int(arr.size)}


# ------------------------------------------------------------------ multi-label targets
# Label columns of task "multilabel": a (N, K) multi-hot matrix per split (CONVENTIONS: a
# fixed-shape (K,) uint8 column). One-vs-rest logistic probes, i.e. K binary heads of one
# joint fit (`fit_logistic_heads`), as CoMM's MM-IMDb evaluation; micro- and macro-F1 at
# probability 0.5 and mAP over the classes with a positive test row.

MULTILABEL_METRICS = ("micro_f1", "macro_f1", "map")


def _multi_hot(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 2 or not np.isin(y, (0, 1)).all():
        raise ValueError("multi-label targets must be an (N, K) 0/1 matrix")
    return y.astype(np.int64)


def average_precision(y_true, scores) -> float:
    """Area under the step precision-recall curve of one class (sklearn's
    `average_precision_score`: tied scores form one threshold); NaN without positives."""
    y_true, scores = np.asarray(y_true).astype(bool), np.asarray(scores, dtype=np.float64)
    positives = int(y_true.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], y_true[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]    # last row of each distinct score
    tps = np.cumsum(t)[last]
    precision = tps / (last + 1)
    recall = tps / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_metrics(y_true, scores, threshold: float = 0.5) -> dict[str, float]:
    """{"micro_f1", "macro_f1", "map"} of (N, K) probabilities against (N, K) 0/1 targets.
    Macro-F1 counts a class with no true and no predicted row as 0 (sklearn's
    zero_division=0); mAP averages the classes with at least one positive."""
    y = _multi_hot(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != y.shape:
        raise ValueError(f"targets {y.shape} and scores {scores.shape} differ in shape")
    pred = scores >= threshold
    tp = (pred & y).sum(axis=0)
    fp = (pred & ~y).sum(axis=0)
    fn = (~pred & y).sum(axis=0)
    denom = 2 * tp + fp + fn
    per_class = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    micro_denom = 2 * tp.sum() + fp.sum() + fn.sum()
    aps = [average_precision(y[:, k], scores[:, k]) for k in range(y.shape[1])]
    aps = [a for a in aps if np.isfinite(a)]
    return {"micro_f1": float(2 * tp.sum() / micro_denom) if micro_denom else 0.0,
            "macro_f1": float(per_class.mean()) if len(per_class) else float("nan"),
            "map": float(np.mean(aps)) if aps else float("nan")}


def fit_multilabel_probe(x, y, l2: float = 1e-4, max_iter: int = 100,
                         init: Sequence[Probe | None] | None = None) -> list[Probe]:
    """K one-vs-rest logistic probes (2-class heads) of (N, K) multi-hot targets."""
    y = _multi_hot(y)
    return fit_logistic_heads(x, [y[:, k] for k in range(y.shape[1])], [2] * y.shape[1],
                              [float(l2)] * y.shape[1], max_iter, init)


def multilabel_scores(probes: Sequence[Probe], x) -> np.ndarray:
    """(N, K) probability of each class being present."""
    return np.stack([torch.softmax(p.decision(x), dim=1)[:, 1].numpy() for p in probes], 1)


def multilabel_probe(x_train, y_train, x_val, y_val, x_test, y_test,
                     grid: Sequence[float] = DEFAULT_L2_GRID, max_iter: int = 100,
                     metric: str = "macro_f1") -> ProbeResult:
    """The linear-probe protocol for multi-label targets: one L2 for all K heads chosen on
    val (macro-F1; ties to the stronger penalty), refit on train+val, metrics on test."""
    y_train, y_val, y_test = _multi_hot(y_train), _multi_hot(y_val), _multi_hot(y_test)
    grid = sorted(float(v) for v in grid)
    k = y_train.shape[1]
    heads = fit_logistic_heads(x_train, [y_train[:, j] for l2 in grid for j in range(k)],
                               [2] * (k * len(grid)), [l2 for l2 in grid for _ in range(k)],
                               max_iter)
    by_l2 = {l2: heads[i * k:(i + 1) * k] for i, l2 in enumerate(grid)}
    val_scores = {l2: multilabel_metrics(y_val, multilabel_scores(p, x_val))[metric]
                  for l2, p in by_l2.items()}
    chosen = _choose_l2(val_scores, grid)
    final = fit_multilabel_probe(_cat(x_train, x_val), _cat(y_train, y_val), chosen, max_iter,
                                 init=by_l2[chosen])
    return ProbeResult(multilabel_metrics(y_test, multilabel_scores(final, x_test)), chosen,
                       val_scores, len(x_train) + len(x_val))


def minimise_lbfgs(weight: torch.Tensor, bias: torch.Tensor, objective, max_iter: int) -> float:
    """Run L-BFGS (strong Wolfe line search) on `objective`, which puts its exact gradient
    into .grad itself; the final objective value."""
    return _run_lbfgs([weight, bias], objective, max_iter)


def _run_lbfgs(params: list, objective, max_iter: int) -> float:
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=int(max_iter),
                            tolerance_grad=1e-7, tolerance_change=1e-10, history_size=20,
                            line_search_fn="strong_wolfe")
    with torch.no_grad():
        opt.step(objective)
        return float(objective())
