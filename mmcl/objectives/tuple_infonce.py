"""TupleInfoNCE (Liu et al., ICCV 2021; docs/methods.md, "TupleInfoNCE").

Anchor: the fused embedding of tuple i in one view. Positive: the same tuple in the other view.
Negatives: the other tuples, plus for every modality k the k-disturbed tuples -- tuple j with
modality k taken from another tuple -- weighted by alpha_k through log-weights on the logits
(the exact form of sampling negatives from the mixture q). A disturbed tuple differs from the
positive only in modality k, so rejecting it forces the encoder to read modality k: weak
modalities can no longer be ignored.

Cost: the modality encoders run once per view. A disturbed set needs only modality k's
*embedding* from another row, so only the fusion and the head run again per disturbed set,
all sets of a direction in one call (`MultimodalEncoder.fuse_swapped`); the transformer
fusion reuses the original tuples' first-layer keys and values (token k's rows permuted) and
computes only the CLS query's attention, output projection, feed-forward and the head per
disturbed tuple: what a disturbed negative inherently needs.
`key_grad: false` stops the gradient through the keys (positive and disturbed tuples), as
the reference code does; the disturbed sets are then computed without autograd.
Unlike the reference code, the permutation is a derangement (no tuple is ever its own disturbed
negative) and alpha_k is an exact weight, not a block replication count.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from mmcl.objectives.base import FusedObjective, LossOutput, ObjectiveError, normalize
from mmcl.objectives.functional import tuple_info_nce
from mmcl.objectives.registry import register


def derangement(n: int, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> Tensor:
    """A uniformly random permutation of range(n) with no fixed point (n >= 2), by rejection:
    a random permutation is a derangement with probability ~1/e, so few draws are needed."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 elements")
    for _ in range(64):
        perm = torch.randperm(n, generator=generator, device=generator.device
                              if generator is not None else device)
        if not bool((perm == torch.arange(n, device=perm.device)).any()):
            return perm.to(device)
    # Astronomically unlikely; a random non-zero cyclic shift is still a derangement.
    shift = int(torch.randint(1, n, (1,), generator=generator,
                              device=generator.device if generator is not None else "cpu"))
    return ((torch.arange(n) + shift) % n).to(device)


@register
class TupleInfoNCE(FusedObjective):
    name = "tuple_infonce"

    def __init__(self, cfg, manifest, model_cfg):
        super().__init__(cfg, manifest, model_cfg)
        self.require_modalities(at_least=2)
        unknown = sorted(set(cfg.negative_weights) - set(self.modalities))
        if unknown:
            raise ObjectiveError(
                f"objective.negative_weights names {unknown}, which the data does not have; "
                f"its modalities are {self.modalities}")
        self.log_weights = cfg.log_weights(self.modalities)

    def active_modalities(self) -> list[tuple[str, float]]:
        """(modality, log alpha) for every modality whose disturbed negatives are on."""
        return [(m, w) for m, w in zip(self.modalities, self.log_weights) if w > -math.inf]

    def swaps(self, embeddings: dict[str, Tensor], generator: torch.Generator | None
              ) -> list[tuple[str, Tensor]]:
        """One (modality k, derangement) per active modality k, drawn in modality order."""
        n = next(iter(embeddings.values())).shape[0]
        return [(m, derangement(n, generator, embeddings[m].device))
                for m, _ in self.active_modalities()]

    def project_with_disturbed(self, embeddings: dict[str, Tensor], swaps
                               ) -> tuple[Tensor, list[Tensor]]:
        """The projected tuples and their disturbed sets, all in one fusion call: the tuples
        themselves are the identity swap, so the transformer fusion's first-layer queries,
        keys and values serve both (a disturbed tuple then costs only what it changes)."""
        n = next(iter(embeddings.values())).shape[0]
        identity = (self.modalities[0], torch.arange(n, device=embeddings[self.modalities[0]]
                                                     .device))
        z = normalize(self.head(self.encoder.fuse_swapped(embeddings, [identity, *swaps])))
        tuples, *disturbed = z.split(n)
        return tuples, disturbed

    def disturbed(self, embeddings: dict[str, Tensor], swaps) -> list[Tensor]:
        """Projected embeddings of the disturbed sets alone."""
        if not swaps:
            return []
        n = next(iter(embeddings.values())).shape[0]
        return list(normalize(self.head(self.encoder.fuse_swapped(embeddings, swaps))).split(n))

    def forward(self, views, batch, generator=None):
        view1, view2 = views
        e1, e2 = self.encoder.encode(view1), self.encoder.encode(view2)
        log_weights = [w for _, w in self.active_modalities()]
        # Keys of direction 1 are view 2's (its derangements drawn first), then direction 2's.
        swaps2 = self.swaps(e2, generator)
        swaps1 = self.swaps(e1, generator) if self.cfg.symmetric else []
        if self.cfg.key_grad and swaps2:
            z1, disturbed1 = (self.project_with_disturbed(e1, swaps1) if swaps1
                              else (self.project(e1), []))
            z2, disturbed2 = self.project_with_disturbed(e2, swaps2)
        else:
            z1, z2 = self.project(e1), self.project(e2)
            with torch.no_grad() if not self.cfg.key_grad else contextlib.nullcontext():
                disturbed2, disturbed1 = self.disturbed(e2, swaps2), self.disturbed(e1, swaps1)
        tau = self.cfg.temperature
        keys1, keys2 = (z1, z2) if self.cfg.key_grad else (z1.detach(), z2.detach())
        loss = tuple_info_nce(z1, keys2, disturbed2, log_weights, tau)
        if self.cfg.symmetric:
            loss = 0.5 * (loss + tuple_info_nce(z2, keys1, disturbed1, log_weights, tau))
        metrics = {}
        if not self.active_modalities():  # the plain tuple loss, for comparison in logs
            metrics["tuple"] = loss.detach()
        return LossOutput(loss, metrics)

    def reward(self, view1: dict[str, Tensor], view2: dict[str, Tensor],
               max_rows: int = 16384) -> dict[str, float]:
        """The sample-optimization reward R = sum_k A^k (see `disturbed_retrieval_reward`)."""
        return disturbed_retrieval_reward(self, view1, view2, max_rows)


@torch.no_grad()
def disturbed_retrieval_reward(objective: FusedObjective, view1: dict[str, Tensor],
                               view2: dict[str, Tensor], max_rows: int = 16384
                               ) -> dict[str, float]:
    """R = sum_k A^k on two views of held-out tuples, for any fused objective.

    A^k: for tuple i's first view, the top-1 accuracy of picking its second view among the
    batch's candidates for modality k: the second view of tuple i with modality k taken from
    each tuple j of the batch (j = i is the true tuple). It is the retrieval that links
    modality k to the rest of its tuple, asked of the representation the objective trains:
    the paper's literal A^k embeds modality k alone, an input TupleInfoNCE's fusion never
    sees in training, and stays at chance (3/256 on `weak` in every round). A^k is at chance
    when the representation ignores modality k, and rises as k is read. Ties count as misses.
    Computed in eval mode; the caller draws the views (the same seeded draws for every
    candidate it compares).
    """
    was_training = objective.training
    objective.eval()
    e1, e2 = objective.encoder.encode(view1), objective.encoder.encode(view2)
    query = objective.project(e1)
    n = query.shape[0]
    scores = {}
    for k in objective.modalities:
        sims = torch.cat([_disturbed_similarities(objective, query, e2, k, columns)
                          for columns in torch.arange(n).split(max(1, max_rows // n))],
                         dim=1)  # (n, n): query i against "tuple i with k from j"
        positive = sims.diagonal().clone()
        sims.fill_diagonal_(-math.inf)
        hits = positive > sims.max(dim=1).values
        scores[f"A_{k}"] = hits.float().mean().item()
    objective.train(was_training)
    return {"R": sum(scores.values()), **scores}


def _disturbed_similarities(objective: FusedObjective, query: Tensor,
                            embeddings: dict[str, Tensor], modality: str,
                            columns: Tensor) -> Tensor:
    """(n, len(columns)): query i against the tuple i with `modality` from tuple j, for j in
    `columns`, fused in one batch of n * len(columns) rows."""
    n, c = query.shape[0], len(columns)
    tiled = {m: e.repeat(c, 1) for m, e in embeddings.items()}  # row j*n + i: tuple i
    tiled[modality] = embeddings[modality][columns].repeat_interleave(n, dim=0)
    z = objective.project(tiled).view(c, n, -1)
    return torch.einsum("id,jid->ij", query, z)
