"""FactorCL (Liang et al., NeurIPS 2023; docs/methods.md, "FactorCL").

Two modalities. Task information splits into shared S and unique U1, U2, each estimated with
its own pair of small heads (one per modality) and critic:
    S  = I_NCE(X1;X2) - I_CLUB(X1;X2 | C)                          shared heads
    U  = I_NCE(X1;C1) + I_NCE(X2;C2) - I_CLUB(X1;X2) + I_NCE(X1;X2 | C)   unique heads
and the loss is -(S + U): six terms of weight 1, as FactorCL's code. In FactorCL-SSL the
context C is the other augmented view (C_i = X_i'); in FactorCL-SUP it is the label Y.
Conditioning concatenates the context to each critic input.

I_NCE uses a critic trained by the main loss. I_CLUB uses a critic f* trained only by its own
InfoNCE learning loss on detached inputs; the main loss sees f* with detached parameters. One
backward of the sum then gives every parameter exactly the gradient of its own loss, and the
CLUB critics' optimiser group (own learning rate) takes one step per batch.
The representation downstream is the concatenation of every head's output for both
modalities, as the paper describes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcl.models import ProjectionHead
from mmcl.objectives.base import LossOutput, Objective, OptimGroup
from mmcl.objectives.critics import ConcatCritic, SeparableCritic
from mmcl.objectives.distributed import gather_no_grad, gather_with_grad, world
from mmcl.objectives.functional import club_upper_bound, nce_lower_bound
from mmcl.objectives.registry import register

# Head pairs: the first two estimate the shared information, the other three the unique.
SHARED_HEADS = ("nce", "club_cond")
UNIQUE_HEADS = ("self", "club", "nce_cond")


class _PairScores(nn.Module):
    """Lets torch.func.functional_call evaluate a critic's pair scores with swapped-in
    (detached) parameters."""

    def __init__(self, critic: nn.Module):
        super().__init__()
        self.critic = critic

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.critic.pair_scores(x, y)


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
        return ConcatCritic(x_dim, y_dim, hidden=self.cfg.critic_hidden)

    def apply_heads(self, head: str, embeddings: list[Tensor]) -> list[Tensor]:
        return [h(e) for h, e in zip(self.heads[head], embeddings)]

    def scores(self, critic: nn.Module, x: Tensor, y: Tensor, frozen: bool = False):
        """Pair scores of every x in the global batch against the local y's, and the row of
        local y_0's positive."""
        rank, _ = world()
        x_all = gather_with_grad(x) if x.requires_grad else gather_no_grad(x)
        if frozen:
            params = {f"critic.{n}": p.detach() for n, p in critic.named_parameters()}
            s = torch.func.functional_call(_PairScores(critic), params, (x_all, y))
        else:
            s = critic.pair_scores(x_all, y)
        return s / self.cfg.temperature, rank * x.shape[0]

    def nce(self, critic, x, y) -> Tensor:
        s, offset = self.scores(critic, x, y)
        return nce_lower_bound(s, offset=offset)

    def club(self, critic, x, y) -> Tensor:
        s, offset = self.scores(critic, x, y, frozen=True)
        return club_upper_bound(s, offset=offset)

    def club_learning_loss(self, critic, x, y) -> Tensor:
        s, offset = self.scores(critic, x.detach(), y.detach())
        return -nce_lower_bound(s, offset=offset)

    # -- the objective
    def forward(self, view1, view2, batch, generator=None):
        m1, m2 = self.modalities
        encoded, encoded_aug = self.encoder.encode(view1), self.encoder.encode(view2)
        e = [encoded[m] for m in (m1, m2)]
        e_aug = [encoded_aug[m] for m in (m1, m2)]

        s1, s2 = self.apply_heads("nce", e)
        c1, c2 = self.apply_heads("club_cond", e)
        cc1, cc2 = self.contexts("club_cond", e_aug, batch)
        u1, u2 = self.apply_heads("self", e)
        uc1, uc2 = self.contexts("self", e_aug, batch)
        k1, k2 = self.apply_heads("club", e)
        n1, n2 = self.apply_heads("nce_cond", e)
        nc1, nc2 = self.contexts("nce_cond", e_aug, batch)
        club_cond_x, club_cond_y = torch.cat([c1, cc1], 1), torch.cat([c2, cc2], 1)

        terms = {
            "nce_x1x2": self.nce(self.critics["nce"], s1, s2),
            "club_x1x2_cond": self.club(self.club_critics["club_cond"], club_cond_x,
                                        club_cond_y),
            "nce_x1c1": self.nce(self.critics["self1"], u1, uc1),
            "nce_x2c2": self.nce(self.critics["self2"], u2, uc2),
            "club_x1x2": self.club(self.club_critics["club"], k1, k2),
            "nce_x1x2_cond": self.nce(self.critics["nce_cond"], torch.cat([n1, nc1], 1),
                                      torch.cat([n2, nc2], 1)),
        }
        shared = terms["nce_x1x2"] - terms["club_x1x2_cond"]
        unique = (terms["nce_x1c1"] + terms["nce_x2c2"] - terms["club_x1x2"]
                  + terms["nce_x1x2_cond"])
        critic_loss = (self.club_learning_loss(self.club_critics["club"], k1, k2)
                       + self.club_learning_loss(self.club_critics["club_cond"], club_cond_x,
                                                 club_cond_y))
        loss = -(shared + unique) + critic_loss
        metrics = {k: v.detach().item() for k, v in terms.items()}
        metrics.update(shared=shared.detach().item(), unique=unique.detach().item(),
                       club_critic_loss=critic_loss.detach().item())
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
