"""pipeline: per-process coverage, pairs inside their groups, determinism, exact resume through Orbax
(mid-epoch, with worker processes), global device arrays, corrupt records, eval mode, source mixing."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from cxrjax import prepare
from cxrjax.data import augment, pairs, pipeline

SIZE = 32  # augmented output side: small keeps the tests fast
STRATEGY = pairs.BEST_STRATEGY  # same patient, same study, any laterality (groups of 1 here)
ANY = "study-any_lat-any"  # same patient, any image: larger groups


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """40 phantom patients (82 train / 26 valid / 16 test images), 64 px, train in 3 shards."""
    out = tmp_path_factory.mktemp("prepared")
    prepare.prepare_dataset("phantom", out, patients=40, size=64, workers=1, shard_size=32,
                            strategies=["instance", STRATEGY, ANY])
    return out


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> Path:
    """The same phantom data as `data_dir`, prepared with --pixels=raw."""
    out = tmp_path_factory.mktemp("prepared_raw")
    prepare.prepare_dataset("phantom", out, patients=40, size=64, workers=1, shard_size=32, pixels="raw",
                            strategies=["instance", STRATEGY, ANY])
    return out


def _cfg(data_dir, **kw):
    base = dict(data_dir=str(data_dir), batch_size=8, augment=augment.AugmentConfig(size=SIZE), num_workers=0,
                process_index=0, process_count=1, seed=3)
    return pipeline.PipelineConfig(**{**base, **kw})


def _batches(cfg, n=None, data=None):
    it = pipeline.make_dataset(cfg, data).__iter__()
    out = [b for _, b in zip(range(n), it)] if n is not None else list(it)
    it.close()
    return out


def _cat(batches, key):
    return np.concatenate([b[key] for b in batches])


def _split_rows(data_dir, split="train"):
    return pipeline.load_prepared(data_dir, split, None).split_rows


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 4])
def test_processes_cover_each_epoch_exactly_once(data_dir, count):
    """P simulated processes x 2 epochs: each epoch's rows over all processes = the split, no repeats,
    and the two epochs come in different orders."""
    rows = {0: [], 1: []}
    for p in range(count):
        cfg = _cfg(data_dir, process_index=p, process_count=count, batch_size=4 * count, num_epochs=2,
                   drop_remainder=False)
        bs = _batches(cfg)
        for epoch in (0, 1):
            rows[epoch].append(_cat(bs, "row")[_cat(bs, "epoch") == epoch])
    want = np.sort(_split_rows(data_dir))
    for epoch in (0, 1):
        got = np.concatenate(rows[epoch])
        assert len(got) == len(want) and np.array_equal(np.sort(got), want)
        assert sum(map(len, rows[epoch])) == len(set(got.tolist()))
    assert not np.array_equal(np.concatenate(rows[0]), np.concatenate(rows[1]))
    # the order all processes share is the documented epoch order, dealt round-robin
    data = pipeline.load_prepared(data_dir, "train", None)
    order = data.split_rows[pipeline.epoch_order(data.n, 3, 1)]
    assert np.array_equal(rows[1][0], order[0::count])


def test_positives_inside_group_and_codes(data_dir):
    data = pipeline.load_prepared(data_dir, "train", STRATEGY)
    bs = _batches(_cfg(data_dir, batch_size=16, num_epochs=2), data=data)
    row, partner = _cat(bs, "row"), _cat(bs, "partner_row")
    assert len(row) == (2 * data.n) // 16 * 16  # full batches over 2 epochs
    for r, q in zip(row, partner):
        assert q in data.positives.group(r)
    # exclude-self (the pipeline's default rule): another image exactly when one qualifies
    fallback = data.positives.fallback[row]
    assert 0 < fallback.mean() < 1
    assert (partner[~fallback] != row[~fallback]).all() and (partner[fallback] == row[fallback]).all()
    assert np.array_equal(_cat(bs, "study"), _cat(bs, "key_study"))  # same-study strategy
    assert np.array_equal(_cat(bs, "patient"), data.codes["patient"][row])
    assert np.array_equal(_cat(bs, "key_laterality"), data.codes["laterality"][partner])
    # the pipeline's partner is exactly the counter-based one of pairs.sample_positive
    epoch = _cat(bs, "epoch")
    for e in (0, 1):
        want = pairs.sample_positive(data.positives, row[epoch == e], 3, e)
        assert np.array_equal(partner[epoch == e], want)
    b = bs[0]
    assert b["query"].shape == b["key"].shape == (16, SIZE, SIZE, 1) and b["query"].dtype == np.uint8


def test_instance_strategy_pairs_image_with_itself(data_dir):
    b = _batches(_cfg(data_dir, strategy="instance"), 1)[0]
    assert np.array_equal(b["row"], b["partner_row"])
    assert not np.array_equal(b["query"], b["key"])  # two different augmentations of one image


def test_deterministic_and_layout_independent(data_dir):
    """Same config -> same batches; another seed -> another order; an example's pixels and partner
    depend only on (seed, epoch, row), not on the process layout or the batch it lands in."""
    a = _batches(_cfg(data_dir), 4)
    b = _batches(_cfg(data_dir), 4)
    for x, y in zip(a, b):
        for k in x:
            assert np.array_equal(x[k], y[k]), k
    c = _batches(_cfg(data_dir, seed=4), 4)
    assert not np.array_equal(_cat(a, "row"), _cat(c, "row"))
    one = {int(r): (q, k, p) for bt in _batches(_cfg(data_dir, batch_size=82, num_epochs=1))
           for r, q, k, p in zip(bt["row"], bt["query"], bt["key"], bt["partner_row"])}
    two = _batches(_cfg(data_dir, process_index=1, process_count=2, batch_size=6, num_epochs=1), 3)
    for bt in two:
        for r, q, k, p in zip(bt["row"], bt["query"], bt["key"], bt["partner_row"]):
            assert np.array_equal(one[int(r)][0], q) and np.array_equal(one[int(r)][1], k) and one[int(r)][2] == p


def test_partners_change_across_epochs(data_dir):
    data = pipeline.load_prepared(data_dir, "train", ANY)
    bs = _batches(_cfg(data_dir, strategy=ANY, batch_size=2, num_epochs=2, drop_remainder=False), data=data)
    row, partner, epoch = _cat(bs, "row"), _cat(bs, "partner_row"), _cat(bs, "epoch")
    p0 = dict(zip(row[epoch == 0], partner[epoch == 0]))
    p1 = dict(zip(row[epoch == 1], partner[epoch == 1]))
    multi = [r for r in p0 if data.positives.sizes[r] > 1]
    assert multi and sum(p0[r] != p1[r] for r in multi) > 0


def test_resume_through_orbax_mid_epoch_with_workers(data_dir, tmp_path):
    """Save (train state + iterator) with a real CheckpointManager after 3 batches of a 10-batch
    epoch, with 2 worker processes and device prefetch; a fresh iterator restored from it yields
    the next batches bit for bit."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    cfg = _cfg(data_dir, batch_size=8, num_workers=2, device_prefetch=2)
    state = {"step": jnp.int32(3), "w": jnp.arange(4, dtype=jnp.float32)}
    it = pipeline.make_iterator(cfg)
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=pipeline.checkpoint_args(it)))
        mngr.wait_until_finished()
    want = [next(it) for _ in range(9)]  # crosses into epoch 1
    it.close()
    assert _cat(want, "epoch").max() == 1

    fresh = pipeline.make_iterator(cfg)
    next(fresh)  # move it away from the saved position first
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), data=pipeline.checkpoint_args(fresh, restore=True)))
    assert int(restored["state"]["step"]) == 3
    got = [next(fresh) for _ in range(9)]
    fresh.close()
    for x, y in zip(want, got):
        assert x.keys() == y.keys()
        for k in x:
            assert np.array_equal(x[k], y[k]), k


def test_device_iterator_global_arrays_and_prefetch_state(data_dir):
    import jax

    mesh = jax.make_mesh((8,), ("data",))
    cfg = _cfg(data_dir, batch_size=16, device_prefetch=3)
    ref = _batches(cfg, 5)
    it = pipeline.make_iterator(cfg, mesh)
    got = [next(it), next(it)]
    state = it.get_state()  # after 2 consumed batches, although up to 3 more are prefetched
    got += [next(it) for _ in range(3)]
    b = got[0]
    assert isinstance(b["query"], jax.Array) and b["query"].shape == (16, SIZE, SIZE, 1)
    assert b["query"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert len(b["query"].addressable_shards) == 8
    for x, y in zip(ref, got):
        for k in x:
            assert np.array_equal(x[k], np.asarray(y[k])), k
    it.set_state(state)
    again = [next(it) for _ in range(3)]
    it.close()
    for x, y in zip(ref[2:], again):
        assert np.array_equal(x["query"], np.asarray(y["query"])) and np.array_equal(x["row"], np.asarray(y["row"]))


class _GarbageReader(pipeline.RecordReader):
    """Returns garbage bytes for chosen records (a record whose bytes were damaged on disk)."""

    bad: frozenset = frozenset()

    def read(self, record):
        return b"\x0a\x05garbage" if record in self.bad else super().read(record)


def test_corrupt_records_skipped_counted_and_limited(data_dir, caplog):
    data = pipeline.load_prepared(data_dir, "train", "instance")
    reader = _GarbageReader(data.out, data.name, "train")
    reader.bad = frozenset({5, 40, 70})
    cfg = _cfg(data_dir, strategy="instance", batch_size=4, num_epochs=1, drop_remainder=False, max_corrupt=3)
    it = pipeline.make_dataset(cfg, data, reader).__iter__()
    rows = _cat(list(it), "row")
    assert it.corrupt_count == 3
    assert sorted(set(data.split_rows) - set(rows.tolist())) == sorted(data.split_rows[[5, 40, 70]])
    assert len(rows) == data.n - 3
    msg = caplog.text
    assert "corrupt record 40 of split 'train'" in msg and "phantom-train.array_record-00001-of-00003" in msg
    assert "#8 in shard" in msg  # record 40 = 9th record of the second shard (32 per shard)

    cfg = _cfg(data_dir, strategy="instance", batch_size=4, num_epochs=1, max_corrupt=2)
    with pytest.raises(pipeline.CorruptRecordError, match=r"3 corrupt records .* max_corrupt=2"):
        list(pipeline.make_dataset(cfg, data, reader))


def test_corrupt_shard_on_disk_names_shard(data_dir, tmp_path):
    """Bytes overwritten in a real shard: riegeli's hash check fails, the record is skipped and the
    error (with max_corrupt=0) names the record and the shard file."""
    out = tmp_path / "copy"
    shutil.copytree(data_dir, out)
    shard = sorted((out / "phantom" / "1.0.0").glob("phantom-train.array_record-00001-*"))[0]
    raw = bytearray(shard.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    shard.write_bytes(bytes(raw))
    cfg = _cfg(out, strategy="instance", batch_size=4, num_epochs=1, drop_remainder=False, max_corrupt=10)
    it = pipeline.make_dataset(cfg).__iter__()
    rows = _cat(list(it), "row")
    n = pipeline.load_prepared(out, "train", None).n
    assert 1 <= it.corrupt_count <= 3 and len(rows) == n - it.corrupt_count
    with pytest.raises(pipeline.CorruptRecordError, match=r"record \d+ of split 'train' \(#\d+ in shard .*00001-of-00003"):
        list(pipeline.make_dataset(_cfg(out, strategy="instance", num_epochs=1, max_corrupt=0)))


def test_hard_negatives(data_dir):
    kind = "patient-other-study"
    data = pipeline.load_prepared(data_dir, "train", STRATEGY, kind)
    cfg = _cfg(data_dir, hard_negatives=kind, num_hard_negatives=2, batch_size=16)
    b = _batches(cfg, 1, data=data)[0]
    assert b["hard_negatives"].shape == (16, 2, SIZE, SIZE, 1) and b["hard_negative_rows"].shape == (16, 2)
    for r, hs, imgs in zip(b["row"], b["hard_negative_rows"], b["hard_negatives"]):
        for h, img in zip(hs, imgs):
            if h < 0:
                assert len(data.hard.group(r)) == 0 and not img.any()
            else:
                assert h in data.hard.group(r) and img.any()
    assert (b["hard_negative_rows"] >= 0).any()


def test_eval_mode(data_dir):
    cfg = _cfg(data_dir, mode="eval", split="valid", shuffle=False, num_epochs=1, drop_remainder=False,
               batch_size=10, augment=augment.AugmentConfig(size=48))
    bs = _batches(cfg)
    data = pipeline.load_prepared(data_dir, "valid", None)
    assert np.array_equal(_cat(bs, "row"), data.split_rows)  # record order, every image once
    assert [len(b["row"]) for b in bs] == [10] * (data.n // 10) + ([data.n % 10] if data.n % 10 else [])
    assert bs[0]["image"].shape == (10, 48, 48, 1) and bs[0]["labels"].shape == (10, 14)
    np.testing.assert_array_equal(_cat(bs, "labels"), data.labels[data.split_rows])
    again = _batches(cfg)
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(bs, again))


def test_config_errors(data_dir):
    with pytest.raises(ValueError, match="split"):
        _cfg(data_dir, split="training")
    with pytest.raises(ValueError, match="hard_negatives"):
        _cfg(data_dir, num_hard_negatives=2)
    with pytest.raises(ValueError, match="divisible"):
        _cfg(data_dir, batch_size=6, process_count=4).local_batch_size()
    with pytest.raises(ValueError, match="unknown"):
        pipeline.PipelineConfig.from_dict({"data_dir": "x", "batchsize": 3})
    cfg = pipeline.PipelineConfig.from_dict({"data_dir": str(data_dir), "augment": {"size": 40}})
    assert cfg.augment == augment.AugmentConfig(size=40)
    with pytest.raises(FileNotFoundError, match="prepare"):
        pipeline.load_prepared(data_dir / "nothing")


def test_raw_pixel_records_give_the_same_batches(data_dir, raw_dir):
    """Raw-pixel records hold exactly the PNG records' pixels: same images, same batches, no decode."""
    png = pipeline.RecordReader(data_dir, "phantom", "train")
    raw = pipeline.RecordReader(raw_dir, "phantom", "train")
    assert (png.format.pixels, raw.format.pixels, raw.format.shape) == ("png", "raw", (64, 64))
    for i in range(len(png)):
        np.testing.assert_array_equal(raw.image(i), png.image(i))
    for x, y in zip(_batches(_cfg(data_dir), 3), _batches(_cfg(raw_dir), 3)):
        for k in x:
            assert np.array_equal(x[k], y[k]), k


def test_device_mode_ships_pixels_and_view_seeds(raw_dir):
    """augment.where='device': the batch holds the prepared pixels of query and partner and the seeds
    of each view; device_augment turns them into the views, deterministically."""
    from cxrjax.data import device_augment

    kind = "patient-other-study"
    aug = augment.AugmentConfig(size=SIZE, where="device")
    data = pipeline.load_prepared(raw_dir, "train", ANY, kind)
    reader = pipeline.RecordReader(raw_dir, "phantom", "train")
    cfg = _cfg(raw_dir, strategy=ANY, augment=aug, hard_negatives=kind, num_hard_negatives=2)
    b = _batches(cfg, 1, data=data)[0]
    assert b["query"].shape == (8, 64, 64, 1) and b["query"].dtype == np.uint8
    assert b["hard_negatives"].shape == (8, 2, 64, 64, 1) and b["hard_negative_seeds"].shape == (8, 2, 2)
    for i, (row, partner, epoch) in enumerate(zip(b["row"], b["partner_row"], b["epoch"])):
        np.testing.assert_array_equal(b["query"][i, ..., 0], reader.image(data.record_of_row[row]))
        np.testing.assert_array_equal(b["key"][i, ..., 0], reader.image(data.record_of_row[partner]))
        np.testing.assert_array_equal(b["query_seed"][i], augment.view_seed(3, epoch, row, 0))
        np.testing.assert_array_equal(b["key_seed"][i], augment.view_seed(3, epoch, row, 1))
        np.testing.assert_array_equal(b["hard_negative_seeds"][i, 1], augment.view_seed(3, epoch, row, 3))
    again = _batches(cfg, 1, data=data)[0]
    q1, k1, h1 = device_augment.contrastive_views(b, aug)
    q2, k2, h2 = device_augment.contrastive_views(again, aug)
    assert q1.shape == (8, SIZE, SIZE, 1) and h1.shape == (8, 2, SIZE, SIZE, 1)
    assert np.array_equal(np.asarray(q1), np.asarray(q2)) and np.array_equal(np.asarray(h1), np.asarray(h2))
    assert not np.array_equal(np.asarray(q1), np.asarray(k1))
