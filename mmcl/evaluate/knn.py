"""The weighted kNN probe (InstDisc, Wu et al. 2018; solo-learn's `WeightedKNNClassifier`).

    knn_probe(x_train, y_train, x_val, y_val, x_test, y_test)  -> {accuracy, balanced_accuracy,
                                                                  macro_f1, k, temperature}

Features are L2-normalised; each test row's k nearest rows by cosine similarity s among the
labelled rows vote for their class with weight exp(s / T), and the class with the largest
total wins (k = 20, T = 0.07, the InstDisc/solo-learn defaults). Protocol beside the linear
probe's: k and T are fixed, so there is nothing to choose on val; the labelled rows are
train + val (the rows the linear probe's refit sees) and every metric is on test. Queries run
in chunks (memory: chunk x labelled rows), float32, on the GPU when there is one.
"""

from __future__ import annotations

import numpy as np

from mmcl.evaluate.probe import classification_metrics

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
DEFAULT_CHUNK = 2048


def _unit(x, device: str):
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.array(x, dtype=np.float32, copy=True)).to(device)
    return F.normalize(t.reshape(len(t), -1), dim=1)


def knn_predict(bank, bank_labels, queries, num_classes: int, k: int = DEFAULT_K,
                temperature: float = DEFAULT_TEMPERATURE, chunk_rows: int = DEFAULT_CHUNK,
                device: str = "auto") -> np.ndarray:
    """Predicted class of every query row by temperature-weighted voting of its k nearest
    bank rows (cosine similarity)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bank_t = _unit(bank, device)
    labels = torch.as_tensor(np.asarray(bank_labels, dtype=np.int64)).to(device)
    if len(bank_t) == 0:
        raise ValueError("kNN probe: no labelled rows")
    k = min(int(k), len(bank_t))
    preds = []
    for start in range(0, len(queries), int(chunk_rows)):
        q = _unit(queries[start:start + int(chunk_rows)], device)
        sims, idx = (q @ bank_t.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(q), int(num_classes), device=device)
        votes.scatter_add_(1, labels[idx], weights)
        preds.append(votes.argmax(dim=1).cpu().numpy())
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def knn_probe(x_train, y_train, x_val, y_val, x_test, y_test, num_classes: int | None = None,
              k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
              device: str = "auto") -> dict[str, float]:
    """kNN accuracy, balanced accuracy and macro-F1 on test, train + val as labelled rows."""
    bank = np.concatenate([np.asarray(x_train), np.asarray(x_val)])
    labels = np.concatenate([np.asarray(y_train), np.asarray(y_val)]).astype(np.int64)
    y_test = np.asarray(y_test).astype(np.int64)
    if num_classes is None:
        num_classes = int(max(labels.max(), y_test.max())) + 1
    pred = knn_predict(bank, labels, np.asarray(x_test), num_classes, k, temperature,
                       device=device)
    return {**classification_metrics(y_test, pred), "k": int(min(k, len(bank))),
            "temperature": float(temperature)}
