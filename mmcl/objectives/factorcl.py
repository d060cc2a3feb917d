"""FactorCL (Liang et al., NeurIPS 2023; docs/methods.md, "FactorCL").

Two modalities. Task information splits into shared S and unique U1, U2, each estimated with
its own pair of small heads (one per modality) and critic:
    S  = I_NCE(X1;X2) - I_CLUB(X1;X2 | C)                          shared heads
    U  = I_NCE(X1;C1) + I_NCE(X2;C2) - I_CLUB(X1;X2) + I_NCE(X1;X2 | C)   unique heads
and the loss is -(S + U): six terms of weight 1, as FactorCL's code. In FactorCL-SSL the
context C is the other augmented view (C_i = X_i'); in FactorCL-SUP it is the label Y.
Conditioning concatenates the context to each critic input.

Cost: a critic scores pairs through an MLP, so all N^2 pairs of a batch are O(N^2 hidden^2).
With `negatives: K` each y is scored against its positive and K sampled other rows of the
global batch (O(N K)); the bounds are then the same bounds with 1 + K candidates
(functional.nce_lower_bound_sampled / club_upper_bound_sampled). `negatives: 0` scores all
pairs, optionally in chunks (`score_chunk`) for memory.

I_NCE uses a critic trained by the main loss. I_CLUB uses a critic f* trained only by its own
InfoNCE learning loss on detached inputs; the main loss sees f* with detached parameters. One
backward of the sum then gives every parameter exactly the gradient of its own loss, and the
CLUB critics' optimiser group (own learning rate) takes one step per batch.
The representation downstream is the concatenation of every head's output for both
modalities, as the paper describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcl.models import ProjectionHead
from mmcl.objectives.base import LossOutput, Objective, OptimGroup
from mmcl.objectives.critics import ConcatCritic, SeparableCritic, sample_rows
from mmcl.objectives.distributed import gather_no_grad, gather_with_grad, world
from mmcl.objectives.functional import (club_upper_bound, club_upper_bound_sampled,
                                        nce_lower_bound, nce_lower_bound_sampled)
from mmcl.objectives.registry import register

# Head pairs: the first two estimate the shared information, the other three the unique.
SHARED_HEADS = ("nce", "club_cond")
UNIQUE_HEADS = ("self", "club", "nce_cond")


@dataclass
class Pair:
    """One quantity for both modalities: (modality 1, modality 2)."""

    x1: Tensor
    x2: Tensor

    def given(self, context: "Pair") -> "Pair":
        """Conditioned on the context: C_i concatenated to each modality's input."""
        return Pair(torch.cat([self.x1, context.x1], 1), torch.cat([self.x2, context.x2], 1))


@dataclass
class Terms:
    """The critics' inputs of the six terms, named after the terms (docs/methods.md):
        S = I_NCE(X1;X2) - I_CLUB(X1;X2|C)
        U = I_NCE(X1;C1) + I_NCE(X2;C2) - I_CLUB(X1;X2) + I_NCE(X1;X2|C)
    each seen through its own head pair."""

    nce_x1x2: Pair          # heads "nce"
    club_x1x2_given_c: Pair  # heads "club_cond", conditioned on C
    x_for_c: Pair           # heads "self": X_i, scored against C_i
    c: Pair                 # heads "self": the contexts C_1, C_2
    club_x1x2: Pair         # heads "club"
    nce_x1x2_given_c: Pair  # heads "nce_cond", conditioned on C


class _PairScores(nn.Module):
    """Lets torch.func.functional_call evaluate a critic's pair scores (all pairs, or the
    sampled rows) with swapped-in (detached) parameters."""

    def __init__(self, critic: nn.Module):
        super().__init__()
        self.critic = critic

    def forward(self, x: Tensor, y: Tensor, rows: Tensor | None = None) -> Tensor:
        return critic_scores(self.critic, x, y, rows)


def critic_scores(critic: nn.Module, x: Tensor, y: Tensor, rows: Tensor | None) -> Tensor:
    """All pair scores (rows None) or the sampled ones (`rows`: see critics.sample_rows)."""
    return critic.pair_scores(x, y) if rows is None else critic.sampled_scores(x, y, rows)


class FactorCL(Objective):
    has_unused_parameters = True  # the fusion module is never used

    def __init__(self, cfg, manifest, model_cfg):
        super().__init__(cfg, manifest, model_cfg)
        self.require_modalities(exactly=2)
        d = model_cfg.embed_dim
        c = self.setup_context(d)
        self.heads = nn.ModuleDict({
            name: nn.ModuleList([ProjectionHead(d, d, d) for _ in range(2)])
            for name in SHARED_HEADS + UNIQUE_HEADS})
        critic = self.make_critic
        self.critics = nn.ModuleDict({
            "nce": critic(d, d), "nce_cond": critic(d + c, d + c),
            "self1": critic(d, c), "self2": critic(d, c)})
        self.club_critics = nn.ModuleDict({"club": critic(d, d),
                                           "club_cond": critic(d + c, d + c)})

    # -- what SSL and SUP differ in
    def setup_context(self, embed_dim: int) -> int:
        """Prepare the conditioning variable; returns its size."""
        raise NotImplementedError

    def contexts(self, head: str, e_aug: list[Tensor], batch) -> list[Tensor]:
        """The conditioning variable C_i for modality i, seen through `head`."""
        raise NotImplementedError

    # -- pieces
    def make_critic(self, x_dim: int, y_dim: int) -> nn.Module:
        if self.cfg.critic == "separable":
            return SeparableCritic(x_dim, y_dim, hidden=self.cfg.critic_hidden)
        return ConcatCritic(x_dim, y_dim, hidden=self.cfg.critic_hidden,
                            chunk=self.cfg.score_chunk)

    def apply_heads(self, head: str, embeddings: list[Tensor]) -> list[Tensor]:
        return [h(e) for h, e in zip(self.heads[head], embeddings)]

    def pair(self, head: str, embeddings: list[Tensor]) -> Pair:
        return Pair(*self.apply_heads(head, embeddings))

    def context_pair(self, head: str, e_aug: list[Tensor], batch) -> Pair:
        return Pair(*self.contexts(head, e_aug, batch))

    def terms_inputs(self, e: list[Tensor], e_aug: list[Tensor], batch) -> Terms:
        """Every head on the two modalities' embeddings `e`; contexts from `e_aug` (SSL) or
        the batch's label (SUP)."""
        return Terms(
            nce_x1x2=self.pair("nce", e),
            club_x1x2_given_c=self.pair("club_cond", e).given(
                self.context_pair("club_cond", e_aug, batch)),
            x_for_c=self.pair("self", e),
            c=self.context_pair("self", e_aug, batch),
            club_x1x2=self.pair("club", e),
            nce_x1x2_given_c=self.pair("nce_cond", e).given(
                self.context_pair("nce_cond", e_aug, batch)))

    def scores(self, critic: nn.Module, x: Tensor, y: Tensor, frozen: bool = False,
               generator: torch.Generator | None = None):
        """Critic scores of x's from the global batch against the local y's, and the row of
        local y_0's positive: all pairs (R, C) with that offset, or, with sampled negatives,
        (C, 1 + K) with the positive first and offset None."""
        rank, _ = world()
        x_all = gather_with_grad(x) if x.requires_grad else gather_no_grad(x)
        offset = rank * x.shape[0]
        rows = None
        k = self.cfg.negatives
        if k and k < len(x_all) - 1:
            rows = sample_rows(len(x_all), offset, len(y), k, generator).to(y.device)
        if frozen:
            params = {f"critic.{n}": p.detach() for n, p in critic.named_parameters()}
            s = torch.func.functional_call(_PairScores(critic), params, (x_all, y, rows))
        else:
            s = critic_scores(critic, x_all, y, rows)
        return s / self.cfg.temperature, None if rows is not None else offset

    def nce(self, critic, x, y, generator=None) -> Tensor:
        s, offset = self.scores(critic, x, y, generator=generator)
        return nce_lower_bound_sampled(s) if offset is None else nce_lower_bound(s, offset)

    def club(self, critic, x, y, generator=None) -> Tensor:
        s, offset = self.scores(critic, x, y, frozen=True, generator=generator)
        return club_upper_bound_sampled(s) if offset is None else club_upper_bound(s, offset)

    def club_learning_loss(self, critic, x, y, generator=None) -> Tensor:
        return -self.nce(critic, x.detach(), y.detach(), generator)

    # -- the objective
    def forward(self, views, batch, generator=None):
        view1, view2 = views
        g = generator  # draws the sampled negatives, if any
        encoded, encoded_aug = self.encoder.encode(view1), self.encoder.encode(view2)
        t = self.terms_inputs([encoded[m] for m in self.modalities],
                              [encoded_aug[m] for m in self.modalities], batch)
        club, club_cond = self.club_critics["club"], self.club_critics["club_cond"]
        # In this order: with sampled negatives, `g` draws each term's rows in turn.
        terms = {
            "nce_x1x2": self.nce(self.critics["nce"], t.nce_x1x2.x1, t.nce_x1x2.x2, g),
            "club_x1x2_cond": self.club(club_cond, t.club_x1x2_given_c.x1,
                                        t.club_x1x2_given_c.x2, g),
            "nce_x1c1": self.nce(self.critics["self1"], t.x_for_c.x1, t.c.x1, g),
            "nce_x2c2": self.nce(self.critics["self2"], t.x_for_c.x2, t.c.x2, g),
            "club_x1x2": self.club(club, t.club_x1x2.x1, t.club_x1x2.x2, g),
            "nce_x1x2_cond": self.nce(self.critics["nce_cond"], t.nce_x1x2_given_c.x1,
                                      t.nce_x1x2_given_c.x2, g),
        }
        shared = terms["nce_x1x2"] - terms["club_x1x2_cond"]
        unique = (terms["nce_x1c1"] + terms["nce_x2c2"] - terms["club_x1x2"]
                  + terms["nce_x1x2_cond"])
        critic_loss = (self.club_learning_loss(club, t.club_x1x2.x1, t.club_x1x2.x2, g)
                       + self.club_learning_loss(club_cond, t.club_x1x2_given_c.x1,
                                                 t.club_x1x2_given_c.x2, g))
        loss = -(shared + unique) + critic_loss
        metrics = {k: v.detach() for k, v in terms.items()}
        metrics.update(shared=shared.detach(), unique=unique.detach(),
                       club_critic_loss=critic_loss.detach())
        return LossOutput(loss, metrics)

    def optimizer_groups(self):
        club = {id(p) for p in self.club_critics.parameters()}
        return {
            "main": OptimGroup([p for p in self.parameters() if id(p) not in club]),
            "club_critics": OptimGroup(list(self.club_critics.parameters()),
                                       lr=self.cfg.critic_lr),
        }

    @torch.no_grad()
    def modality_embeddings(self, batch):
        encoded = self.encoder.encode(batch)
        return {m: torch.cat([self.heads[h][i](encoded[m]) for h in SHARED_HEADS + UNIQUE_HEADS],
                             dim=-1)
                for i, m in enumerate(self.modalities)}

    @torch.no_grad()
    def embed(self, batch):
        return torch.cat(list(self.modality_embeddings(batch).values()), dim=-1)

    @torch.no_grad()
    def sub_embeddings(self, batch):
        """FactorCL's factorized representations (its paper's Table 1 probes each alone):
        Z_S = the shared heads' outputs of both modalities, Z_U1 / Z_U2 = the unique heads'
        outputs of modality 1 / 2. Together they are `embed`, in another column order."""
        encoded = self.encoder.encode(batch)
        e = [encoded[m] for m in self.modalities]

        def heads(names, i):
            return [self.heads[h][i](e[i]) for h in names]

        return {"Z_S": torch.cat(heads(SHARED_HEADS, 0) + heads(SHARED_HEADS, 1), dim=-1),
                "Z_U1": torch.cat(heads(UNIQUE_HEADS, 0), dim=-1),
                "Z_U2": torch.cat(heads(UNIQUE_HEADS, 1), dim=-1)}

    @torch.no_grad()
    def shared_embeddings(self, batch):
        """With the separable critic, I_NCE(X1;X2) scores g(s1) . h(s2) of the shared heads:
        those are a shared space (dot product). The concat critic scores pairs with an MLP,
        which defines no embedding space: {}."""
        critic = self.critics["nce"]
        if not isinstance(critic, SeparableCritic):
            return {}
        encoded = self.encoder.encode(batch)
        s1, s2 = self.apply_heads("nce", [encoded[m] for m in self.modalities])
        return dict(zip(self.modalities, (critic.g(s1), critic.h(s2))))


@register
class FactorCLSSL(FactorCL):
    """Self-supervised: the context of modality i is its other augmented view X_i'."""

    name = "factorcl_ssl"

    def setup_context(self, embed_dim):
        return embed_dim

    def contexts(self, head, e_aug, batch):
        return self.apply_heads(head, e_aug)


@register
class FactorCLSup(FactorCL):
    """Supervised: the context is the label Y (one-hot), for both modalities."""

    name = "factorcl_sup"

    def setup_context(self, embed_dim):
        self.label_column, self.num_classes = self.classification_label(self.cfg.label_column)
        return self.num_classes

    def contexts(self, head, e_aug, batch):
        y = F.one_hot(batch[self.label_column].long(), self.num_classes).to(e_aug[0].dtype)
        return [y, y]
