"""What every objective is: a module that turns augmented views of a batch into a loss.

The training loop knows only this interface, never an objective's name:
- `num_views`: how many augmented views of each tuple the objective contrasts (each view
  costs one pass of every encoder, so the loop builds no more than this).
- `forward(views, batch, generator)` -> `LossOutput(loss, metrics)`; `views` is a list of
  `num_views` augmented batches, `batch` the un-augmented batch (labels live there; CoMM's
  paper variant reads its modalities). Metrics are detached tensors: the loop reads them from
  the device only when it logs.
- `optimizer_groups()` -> the parameter groups each optimiser steps. All groups are stepped
  after ONE backward of `loss`: an objective whose auxiliary networks must not be moved by the
  main loss (FactorCL's CLUB critics) evaluates them with detached parameters and adds their
  own learning loss on detached inputs, so each group's gradient is exactly its own loss's.
- `embed(batch)` -> the representation handed downstream; `modality_embeddings(batch)` ->
  each modality's own representation (for per-modality probes); `sub_embeddings(batch)` ->
  the named parts of the representation an objective factorizes it into (FactorCL's Z_S,
  Z_U1, Z_U2), so probes can read each part alone; {} for an unfactorized one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcl.config import ModelConfig
from mmcl.data.schema import Manifest
from mmcl.models import MultimodalEncoder, ProjectionHead

Batch = Mapping[str, Tensor]


@dataclass
class LossOutput:
    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class OptimGroup:
    """Parameters stepped by one optimiser; None fields take the run's train settings."""

    params: list[nn.Parameter]
    lr: float | None = None
    weight_decay: float | None = None


class ObjectiveError(ValueError):
    """An objective cannot run on this data or config; the message says what to change."""


class Objective(nn.Module):
    name: ClassVar[str]
    # True when some parameters get no gradient in a step (DDP must then look for them).
    has_unused_parameters: ClassVar[bool] = False
    # data.missing=mask: True when a tuple's absent modality (batch["<m>__present"] false)
    # contributes nothing to the loss; build_objective refuses mask for the others.
    supports_missing: ClassVar[bool] = False
    # Whether the loss reads the fusion module (then mask also needs a fusion that treats
    # absence exactly: model.fusion=transformer).
    uses_fusion: ClassVar[bool] = True
    # Augmented views per tuple the loss contrasts (an instance may set its own from config).
    num_views: int = 2

    def __init__(self, cfg, manifest: Manifest, model_cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.manifest = manifest
        self.modalities = manifest.modality_names
        self.encoder = MultimodalEncoder(manifest.modalities, model_cfg)

    # -- the interface the loop uses
    def forward(self, views: list[Batch], batch: Batch,
                generator: torch.Generator | None = None) -> LossOutput:
        raise NotImplementedError

    def optimizer_groups(self) -> dict[str, OptimGroup]:
        return {"main": OptimGroup([p for p in self.parameters() if p.requires_grad])}

    @torch.no_grad()
    def embed(self, batch: Batch) -> Tensor:
        """Fused pre-projection embedding (what CoMM probes)."""
        return self.encoder(batch)

    @torch.no_grad()
    def modality_embeddings(self, batch: Batch) -> dict[str, Tensor]:
        return self.encoder.encode(batch)

    @torch.no_grad()
    def sub_embeddings(self, batch: Batch) -> dict[str, Tensor]:
        """{name: (B, D_name)}: the sub-representations the objective factorizes its
        representation into, each probed alone (FactorCL: Z_S, Z_U1, Z_U2); {} when the
        representation is not factorized."""
        return {}

    @torch.no_grad()
    def shared_embeddings(self, batch: Batch) -> dict[str, Tensor]:
        """Each modality's embedding in the space the loss compares modalities in, scored by
        dot product (cross-modal retrieval); {} when the loss compares no single modality
        with another (an objective on fused tuples only)."""
        return {}

    # -- helpers shared by objectives
    def require_modalities(self, at_least: int = 2, exactly: int | None = None) -> None:
        m = len(self.modalities)
        if exactly is not None and m != exactly:
            raise ObjectiveError(
                f"objective {self.name!r} needs exactly {exactly} modalities, the data has {m} "
                f"({self.modalities}); choose {exactly} with data.modalities=[...]")
        if m < at_least:
            raise ObjectiveError(
                f"objective {self.name!r} needs at least {at_least} modalities, the data has "
                f"{m} ({self.modalities})")

    def classification_label(self, column: str | None) -> tuple[str, int]:
        """(column, num_classes) of the label a supervised objective uses."""
        labels = [lab for lab in self.manifest.labels if lab.task == "classification"]
        if column is None:
            preferred = [lab for lab in labels if lab.role == "label"] or labels
            if not preferred:
                raise ObjectiveError(f"objective {self.name!r} needs a classification label "
                                     "column and the data has none")
            return preferred[0].name, preferred[0].num_classes
        spec = self.manifest.label(column)
        if spec.task != "classification":
            raise ObjectiveError(f"objective {self.name!r}: label column {column!r} is a "
                                 f"{spec.task} label; it needs a classification label")
        return spec.name, spec.num_classes


def normalize(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


class FusedObjective(Objective):
    """An objective on fused tuple embeddings: encoders, fusion, then one projection head.
    A tuple's absent modality is left out of its fused embedding (TransformerFusion drops
    its token), so a loss on whole fused tuples honours data.missing=mask."""

    supports_missing = True

    def __init__(self, cfg, manifest: Manifest, model_cfg: ModelConfig):
        super().__init__(cfg, manifest, model_cfg)
        self.head = ProjectionHead(model_cfg.embed_dim, model_cfg.proj_hidden,
                                   model_cfg.proj_dim)

    def project(self, embeddings: Mapping[str, Tensor], keep=None) -> Tensor:
        """normalize(head(fuse(embeddings restricted to `keep`)))."""
        return normalize(self.head(self.encoder.fuse(embeddings, keep)))

    # The default: {}. TupleInfoNCE, Tuple and SupCon compare fused tuples only (their fusion
    # never sees one modality alone), so single-modality vectors share no trained space.


class CrossModalObjective(Objective):
    """An objective that scores modalities against each other (cross, siglip): each
    modality's embedding through its own projection head; no fusion module, so the
    representation downstream is the concatenation of the per-modality embeddings."""

    has_unused_parameters = True  # the fusion module is never used
    uses_fusion = False

    def __init__(self, cfg, manifest: Manifest, model_cfg: ModelConfig):
        super().__init__(cfg, manifest, model_cfg)
        self.require_modalities(at_least=2)
        self.heads = nn.ModuleDict({
            m: ProjectionHead(model_cfg.embed_dim, model_cfg.proj_hidden, model_cfg.proj_dim)
            for m in self.modalities})

    def project(self, view: Batch) -> dict[str, Tensor]:
        embeddings = self.encoder.encode(view)
        return {m: normalize(self.heads[m](e)) for m, e in embeddings.items()}

    @torch.no_grad()
    def embed(self, batch: Batch) -> Tensor:
        return torch.cat(list(self.encoder.encode(batch).values()), dim=-1)

    @torch.no_grad()
    def shared_embeddings(self, batch: Batch) -> dict[str, Tensor]:
        """Each modality through its own head, normalised: the space the loss compares
        modalities in."""
        return self.project(batch)


def pair_present(batch: Batch, a: str, b: str) -> Tensor | None:
    """bool (B,): the rows of `batch` where modalities a and b are both present
    (data.missing=mask); None when neither can be absent."""
    from mmcl.data.schema import present_column

    flags = [batch[present_column(m)].bool() for m in (a, b) if present_column(m) in batch]
    if not flags:
        return None
    return flags[0] & flags[1] if len(flags) == 2 else flags[0]
