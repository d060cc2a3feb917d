"""mmcl: distributed multimodal contrastive pretraining on Ray."""

__version__ = "0.1.0"

