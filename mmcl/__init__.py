"""mmcl: distributed multimodal contrastive pretraining on Ray."""

__version__ = "0.1.0"



def load(path: str, endpoint_url: str | None = None, region: str | None = None):
    """Open a trained model (run folder, its model/ folder, or a checkpoint) without Ray.

    Returns a `TrainedModel` with `.embed(batch)` and `.modality_embeddings(batch)`, where a
    batch maps modality names to arrays of shape (N, *shape).
    """
    from mmcl.train.checkpoint import load as _load  # torch is heavy: import on use

    return _load(path, endpoint_url, region)
