"""A file order per epoch for Ray Data reads (imports Ray: kept out of mmcl.data.pipeline's
import, which stays cheap)."""

from __future__ import annotations

from dataclasses import dataclass

from ray.data import FileShuffleConfig

from mmcl.data.pipeline import file_shuffle_seed


@dataclass
class EpochFileShuffle(FileShuffleConfig):
    """Ray Data's FileShuffleConfig, seeded by epoch rather than by execution: execution k
    of a dataset built for `first_epoch` gets the file order of epoch first_epoch + k. Ray's
    own reseeding hashes (seed, execution index), so a run resumed by a new driver (whose
    dataset starts again at execution 0) would replay epoch 0's order."""

    first_epoch: int = 0

    def get_seed(self, execution_idx: int = 0) -> int | None:
        if self.seed is None:
            return None
        return file_shuffle_seed(self.seed, self.first_epoch + execution_idx)
