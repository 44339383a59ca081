import numpy as np
import pytest

from tl.data import load_embedded, sample_episodes
from tl.errors import DataError


def labels():
    return load_embedded("optdigits").split("test").labels


def test_same_seed_same_episodes_and_prefix_stable():
    a = sample_episodes(labels(), None, 5, 15, 10, seed=3)
    b = sample_episodes(labels(), None, 5, 15, 4, seed=3)
    for x, y in zip(a, b):
        assert np.array_equal(x.support, y.support) and np.array_equal(x.query, y.query)
    c = sample_episodes(labels(), None, 5, 15, 4, seed=4)
    assert not np.array_equal(a[0].support, c[0].support)


def test_support_and_query_disjoint_and_balanced():
    y = labels()
    for ep in sample_episodes(y, 5, 3, 7, 20, seed=0):
        assert not set(ep.support) & set(ep.query)
        assert len(ep.support) == 15 and len(ep.query) == 35
        assert np.bincount(ep.support_labels).tolist() == [3] * 5
        # episode labels map back to the dataset's classes
        assert np.array_equal(np.array(ep.classes)[ep.support_labels], y[ep.support])
        assert np.array_equal(np.array(ep.classes)[ep.query_labels], y[ep.query])


def test_class_without_a_query_left_is_named():
    y = np.array([0] * 30 + [1] * 30 + [2] * 5)
    with pytest.raises(DataError, match=r"class 'two' has 5 images, fewer than shots \+ one query = 5 \+ 1"):
        sample_episodes(y, None, 5, 10, 1, seed=0, class_names=["zero", "one", "two"])


def test_small_data_mode_uses_every_remaining_image_as_queries():
    y = np.array([0] * 30 + [1] * 30 + [2] * 12)
    full = sample_episodes(np.array([0] * 30 + [1] * 30 + [2] * 30), None, 5, 10, 3, seed=4)
    for ep, ref in zip(sample_episodes(y, None, 5, 10, 3, seed=4), full):
        assert ep.query_counts() == {0: 10, 1: 10, 2: 7}
        assert set(np.flatnonzero(y == 2)) <= set(ep.support) | set(ep.query)
        assert not set(ep.support) & set(ep.query)
        # classes with enough images draw exactly what they drew before
        assert np.array_equal(ep.support[:10], ref.support[:10]) and np.array_equal(ep.query[:20], ref.query[:20])


@pytest.mark.parametrize("k,q,e", [(0, 5, 1), (1, 0, 1), (1, 1, 0)])
def test_bad_counts(k, q, e):
    with pytest.raises(DataError):
        sample_episodes(labels(), None, k, q, e, seed=0)


def test_a_validation_episode_never_trains_on_its_own_queries():
    """When the unlabelled pool is the episode's own split (validation episodes of an adaptation
    strategy), each episode's queries are left out of its pool; a separate pool is passed whole."""
    from collections import Counter

    import torch

    from tl.evaluate import Episodes
    from tl.models import build_backbone
    from tl.strategies import make_strategy

    data = load_embedded("optdigits:novel")
    dann = make_strategy("dann")
    eps = Episodes([dann], data, 1, 5, 2, 0, None, build_backbone("digits_cnn"), None, unlabelled=data)
    for ep in eps.episodes:
        task = eps.task(dann, ep)
        pool = task.unlabelled_x
        assert len(pool) == len(data) - len(ep.query)
        rows = lambda t: Counter(map(tuple, t.flatten(1)[:, ::7].tolist()))  # noqa: E731
        assert rows(pool) == rows(eps.pool) - rows(task.query_x)  # the pool less exactly its queries
    other = Episodes([dann], data, 1, 5, 1, 0, None, build_backbone("digits_cnn"), None,
                      unlabelled=load_embedded("optdigits:novel"))
    assert len(other.task(dann, other.episodes[0]).unlabelled_x) == len(data)
    assert torch.is_tensor(other.pool)


def test_validation_and_selection_episodes_are_not_the_test_episodes():
    """Validation episode i and test episode i come from different generators, so with n_way below
    the class count they do not draw the same classes; the test stream stays ``[seed, i]``."""
    from tl.data.episodes import STREAMS

    labels = np.repeat(np.arange(10), 30)
    test = sample_episodes(labels, 5, 1, 5, 40, 0)
    val = sample_episodes(labels, 5, 1, 5, 40, 0, stream=STREAMS["validation"])
    sel = sample_episodes(labels, 5, 1, 5, 40, 0, stream=STREAMS["selection"])
    same = sum(a.classes == b.classes for a, b in zip(test, val))
    assert same <= 2  # 252 five-class subsets: a chance match or two at most, never all 40
    assert sum(a.classes == b.classes for a, b in zip(val, sel)) <= 2
    ep = test[3]
    want = np.sort(np.random.default_rng([0, 3]).choice(np.arange(10), size=5, replace=False))
    assert ep.classes == tuple(int(c) for c in want)
