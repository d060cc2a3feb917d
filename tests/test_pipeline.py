"""The Ray data plane: shards -> Ray Data -> equal worker streams of torch batches."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmcl.data import pipeline
from mmcl.data.schema import DataError
from mmcl.data.shards import list_shards, read_manifest, read_split
from mmcl.data.synth import generate
from conftest import worker_shards

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]



@pytest.fixture(scope="module")
def rus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rus"))
    generate("rus", root, n=600, seed=0)
    return root, read_manifest(root)


def consume(iterators, batch_size, **kwargs):
    """Iterate the workers' streams concurrently, as Ray Train's workers do."""
    from concurrent.futures import ThreadPoolExecutor

    def run(args):
        rank, it = args
        return list(pipeline.iter_worker_batches(it, batch_size, rank=rank, **kwargs))

    with ThreadPoolExecutor(len(iterators)) as pool:
        return list(pool.map(run, enumerate(iterators)))


def test_workers_get_equal_full_batches_of_the_right_tensors(rus):
    root, manifest = rus
    ds = pipeline.build_dataset(root, "train", manifest, seed=0)
    per_worker = consume(worker_shards(ds, 2), batch_size=32)
    n = manifest.splits["train"]
    assert [len(b) for b in per_worker] == [(n // 2) // 32] * 2
    batch = per_worker[0][0]
    for spec in manifest.modalities:
        assert batch[spec.name].shape == (32, *spec.shape)
        assert batch[spec.name].dtype == torch.float32
    assert batch["id"].dtype == torch.int64
    ids = torch.cat([b["id"] for worker in per_worker for b in worker]).tolist()
    assert len(ids) == len(set(ids)), "a row reached two workers"


def test_workers_see_disjoint_rows_that_cover_the_split(rus):
    root, manifest = rus
    all_ids = set(read_split(root, "train", columns=[])["id"].tolist())
    ds = pipeline.build_dataset(root, "train", manifest, seed=0)
    per_worker = consume(worker_shards(ds, 3), batch_size=1)
    seen = [set(torch.cat([b["id"] for b in batches]).tolist()) for batches in per_worker]
    assert len({len(s) for s in seen}) == 1, "workers got different row counts"
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    union = set().union(*seen)
    assert union <= all_ids and len(all_ids - union) < 3  # only the equal-split remainder


def test_streamed_values_equal_the_shards(rus):
    root, manifest = rus
    expected = read_split(root, "train")
    ds = pipeline.build_dataset(root, "train", manifest, shuffle_files=False)
    (batches,) = consume(worker_shards(ds, 1), batch_size=50)
    got = {k: torch.cat([b[k] for b in batches]).numpy() for k in batches[0]}
    row = {int(i): j for j, i in enumerate(expected["id"])}
    idx = [row[int(i)] for i in got["id"]]
    for name in manifest.modality_names:
        np.testing.assert_array_equal(got[name], expected[name][idx])


def test_file_order_is_seeded_and_changes_between_epochs(tmp_path, rus):
    root, manifest = rus
    # Many small shards, so that a file shuffle is visible.
    from mmcl.data.shards import write_dataset

    small = str(tmp_path / "small")
    write_dataset(small, manifest, {"train": read_split(root, "train")}, max_rows_per_shard=40)

    def epoch_ids(split):
        (batches,) = consume(split, batch_size=40)
        return torch.cat([b["id"] for b in batches]).tolist()

    # As in Ray Train: one split per run, iterated once per epoch.
    split_a = worker_shards(
        pipeline.build_dataset(small, "train", manifest, seed=3), 1)
    split_b = worker_shards(
        pipeline.build_dataset(small, "train", manifest, seed=3), 1)
    first_a, second_a = epoch_ids(split_a), epoch_ids(split_a)
    assert first_a == epoch_ids(split_b), "same seed, different order"
    assert first_a != second_a, "the second epoch repeated the first epoch's order"
    assert sorted(first_a) == sorted(second_a)


def test_in_stream_shuffle_is_seeded_per_epoch(rus):
    root, manifest = rus
    ds = pipeline.build_dataset(root, "train", manifest, shuffle_files=False)

    def ids(epoch):
        (batches,) = consume(worker_shards(ds, 1), batch_size=32,
                             shuffle_buffer=128, seed=1, epoch=epoch)
        return torch.cat([b["id"] for b in batches]).tolist()

    assert ids(0) == ids(0)
    assert ids(0) != ids(1)


def _poison(root, tmp_path, manifest):
    """A copy of the train split whose shard has one NaN in modality 'a'."""
    from mmcl.data.shards import write_dataset

    arrays = read_split(root, "train")
    name = manifest.modality_names[0]
    arrays[name][7, 0] = np.nan
    bad = str(tmp_path / "nan")
    write_dataset(bad, manifest, {"train": arrays})
    return bad, name, int(arrays["id"][7])


def test_every_epoch_of_a_many_file_split_takes_the_same_full_batches_on_every_worker(
        tmp_path, rus):
    """Ray Data's local shuffle yields short batches at block boundaries in mid-stream (a
    224x224 run took 14, 14 and 8 steps where its epochs had 12): with many small files and
    a shuffle buffer of one batch, each worker's every epoch is floor(rows / batch) full
    batches, through the run's own EpochStream."""
    from concurrent.futures import ThreadPoolExecutor

    from mmcl.data.shards import write_dataset

    root, manifest = rus
    splits = {s: read_split(root, s) for s in manifest.splits}
    many = str(tmp_path / "many")
    manifest = write_dataset(many, manifest, splits, max_rows_per_shard=25)
    assert len(list_shards(many, "train")) > 10
    workers, batch_size, epochs = 2, 32, 2
    ds = pipeline.build_dataset(many, "train", manifest, seed=0)

    def run(args):
        rank, shard = args
        stream = pipeline.EpochStream(
            lambda e: pipeline.iter_worker_batches(shard, batch_size, shuffle_buffer=batch_size,
                                                   seed=0, epoch=e, rank=rank), range(epochs))
        try:
            return [[len(b["id"]) for _, b in stream.epoch(e)] for e in range(epochs)]
        finally:
            stream.close()

    with ThreadPoolExecutor(workers) as pool:
        sizes = list(pool.map(run, enumerate(worker_shards(ds, workers))))
    full = [batch_size] * ((manifest.splits["train"] // workers) // batch_size)
    assert sizes == [[full] * epochs] * workers


def test_nonfinite_rows_fail_with_a_data_error_naming_modality_and_id(tmp_path, rus):
    root, manifest = rus
    bad, name, bad_id = _poison(root, tmp_path, manifest)
    ds = pipeline.build_dataset(bad, "train", manifest, nonfinite="fail")
    with pytest.raises(DataError, match=rf"modality '{name}'.*{bad_id}.*data.nonfinite=drop"):
        consume(worker_shards(ds, 1), batch_size=32)


def test_nonfinite_rows_are_dropped_and_counted(tmp_path, rus):
    root, manifest = rus
    bad, name, bad_id = _poison(root, tmp_path, manifest)
    counter = pipeline.DropCounter.create()
    ds = pipeline.build_dataset(bad, "train", manifest, nonfinite="drop", drop_counter=counter,
                                shuffle_files=False)
    (batches,) = consume(worker_shards(ds, 1), batch_size=1)
    ids = torch.cat([b["id"] for b in batches]).tolist()
    assert bad_id not in ids and len(ids) == manifest.splits["train"] - 1
    assert counter.counts()["train"] == {"rows": 1, name: 1}


def test_a_shard_that_disagrees_with_the_manifest_fails_before_reading(tmp_path, rus):
    root, manifest = rus
    arrays = read_split(root, "train")
    name = manifest.modality_names[0]
    table = pa.table({"id": arrays["id"],
                      name: pa.array(arrays[name].tolist(), pa.list_(pa.float32()))})
    (tmp_path / "bad" / "train").mkdir(parents=True)
    path = tmp_path / "bad" / "train" / "part-00000.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError, match=rf"{name}"):
        pipeline.build_dataset(str(tmp_path / "bad"), "train", manifest, columns=[name])


def test_empty_split_names_the_folder(tmp_path, rus):
    root, manifest = rus
    with pytest.raises(DataError, match="no shard files"):
        pipeline.build_dataset(str(tmp_path), "train", manifest)
    assert list_shards(root, "train")
