"""jb.data: the digits set, stratified hold-out splits and batching."""

import jax
import numpy as np
import pytest

import jaxopt_big as jb


def test_digits_images_and_flat_normalized():
    img, flat = jb.data.digits(), jb.data.digits(flat=True)
    assert img.x.shape == (1797, 8, 8, 1) and flat.x.shape == (1797, 64)
    assert img.x.min() == 0.0 and img.x.max() == 1.0 and img.x.dtype == np.float32
    np.testing.assert_array_equal(img.x.reshape(1797, -1), flat.x)
    assert sorted(np.unique(img.y)) == list(range(10))


def test_holdout_split_is_stratified_disjoint_and_seeded():
    ds = jb.data.digits(flat=True)
    train, test = jb.data.holdout_split(ds, test_fraction=0.2, seed=3)
    assert len(train) + len(test) == len(ds)
    rows = {r.tobytes() for r in train.x}
    assert sum(r.tobytes() in rows for r in test.x) <= 5  # digits has a few duplicate images, no shared rows
    for c in range(10):
        share = (test.y == c).sum() / (ds.y == c).sum()
        assert abs(share - 0.2) < 0.02
    again, _ = jb.data.holdout_split(ds, test_fraction=0.2, seed=3)
    np.testing.assert_array_equal(again.y, train.y)
    with pytest.raises(ValueError, match="test_fraction"):
        jb.data.holdout_split(ds, test_fraction=1.5)
    np.testing.assert_array_equal(jb.data.holdout_split(ds, seed=np.int64(3))[0].y, train.y)
    for seed in (True, -1, 2.5):
        with pytest.raises((TypeError, ValueError), match="holdout_split.seed"):
            jb.data.holdout_split(ds, seed=seed)


def test_batches_cover_everything_once_and_shuffle_by_key():
    ds = jb.data.Dataset(np.arange(103), np.arange(103))
    seen = np.concatenate([b.x for b in jb.data.batches(ds, 10, key=jax.random.key(0))])
    assert sorted(seen.tolist()) == list(range(103)) and seen.tolist() != list(range(103))
    dropped = list(jb.data.batches(ds, 10, key=jax.random.key(0), drop_remainder=True))
    assert len(dropped) == 10 and all(len(b) == 10 for b in dropped)
    with pytest.raises(ValueError):
        next(jb.data.batches(ds, 0))
