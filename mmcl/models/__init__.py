"""Models: per-modality encoders, fusion modules and projection heads. Plain PyTorch."""

from mmcl.models.encoders import build_encoder
from mmcl.models.fusion import ConcatFusion, LinearFusion, TransformerFusion
from mmcl.models.heads import ProjectionHead
from mmcl.models.multimodal import Embeddings, MultimodalEncoder
from mmcl.models.registry import register_encoder

__all__ = ["build_encoder", "ConcatFusion", "LinearFusion", "TransformerFusion",
           "ProjectionHead", "MultimodalEncoder", "Embeddings", "register_encoder"]
