"""mmcl: distributed multimodal contrastive pretraining on Ray."""

__version__ = "0.1.0"



def load(path: str, endpoint_url: str | None = None, region: str | None = None, *,
         trust_plugins: bool = False):
    """Open a trained model (run folder, its model/ folder, or a checkpoint) without Ray.

    Returns a `TrainedModel` with `.embed(batch)` and `.modality_embeddings(batch)`, where a
    batch maps modality names to arrays of shape (N, *shape).

    A run whose recorded config names a plug-in encoder (`kind: "package.module:Class"`) is
    refused unless `trust_plugins=True`: loading it imports that module and runs its code,
    and a run folder may have been edited by anyone who could write to it. mmcl's own encoder
    kinds, and kinds registered with `mmcl.models.register_encoder` in this process, load
    without it.
    """
    from mmcl.train.checkpoint import load as _load  # torch is heavy: import on use

    return _load(path, endpoint_url, region, trust_plugins=trust_plugins)
