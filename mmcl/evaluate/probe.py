"""Linear probes: how much of a label (or latent factor) a frozen representation holds.

    probe = fit_probe(x_train, y_train, "classification")   # or "regression"
    score(probe, x_test, y_test)    -> {"accuracy", "balanced_accuracy"} | {"r2"}

Features are standardised with the training mean/std; classification is multinomial logistic
regression, regression is ridge regression, both with an L2 penalty `l2 * ||W||^2` (bias not
penalised) and fitted full batch with L-BFGS in float64 on the CPU, so a fit is deterministic.
Both metrics are reported because the papers differ (CoMM: balanced accuracy; FactorCL:
accuracy). `select_l2` picks the penalty on a validation split (CoMM's protocol).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ProbeTask = Literal["classification", "regression"]
DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


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
              max_iter: int = 100) -> Probe:
    """Fit a linear probe on features x (N, D) and targets y (N,) (regression also (N, K))."""
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
    weight = torch.zeros(z.shape[1], outputs, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(outputs, dtype=torch.float64, requires_grad=True)
    if task == "regression":
        with torch.no_grad():
            bias.copy_(yt.mean(dim=0))

    def objective() -> torch.Tensor:
        out = z @ weight + bias
        data = (F.cross_entropy(out, yt) if task == "classification"
                else 0.5 * ((out - yt) ** 2).sum(dim=1).mean())
        return data + l2 * (weight ** 2).sum()

    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=int(max_iter),
                            tolerance_grad=1e-7, tolerance_change=1e-10, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        final = float(objective())
    return Probe(task, mean, std, weight.detach(), bias.detach(), num_classes, float(l2), final)


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
