"""TensorTasks: a multi-task data module over given tensors."""
import pytest
import torch

from tvq_lightning.data.multitask import TensorTasks
from tvq_lightning.errors import TvqError


def data() -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for t, (k, n) in {"a": (3, 10), "b": (5, 7)}.items():
        out[t] = {s: (torch.randn(n * m, 6, generator=g), torch.randint(0, k, (n * m,), generator=g))
                  for s, m in (("train", 3), ("val", 1), ("test", 2))}
    return out


def test_loaders_serve_the_given_tensors():
    d = data()
    dm = TensorTasks(d, {"a": 3, "b": 5}, batch_size=4, eval_batch_size=8, train_task="b")
    assert dm.tasks == ["a", "b"] and dm.num_classes("a") == 3 and dm.num_classes("b") == 5
    xs, ys = zip(*dm.train_dataloader())
    assert [len(x) for x in xs] == [4, 4, 4, 4, 4, 1]
    x, y = torch.cat(xs), torch.cat(ys)
    ref_x, ref_y = d["b"]["train"]
    assert not torch.equal(x, ref_x)  # shuffled ...
    mine, ref = x[:, 0].argsort(), ref_x[:, 0].argsort()
    assert torch.equal(x[mine], ref_x[ref]) and torch.equal(y[mine], ref_y[ref])  # ... but the same pairs
    for split, loaders in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        assert len(loaders) == 2
        for task, loader in zip(("a", "b"), loaders):
            bx, by = map(torch.cat, zip(*loader))
            assert torch.equal(bx, d[task][split][0]) and torch.equal(by, d[task][split][1])  # in order


def test_unlabelled_adaptation_loader_gives_test_inputs_only():
    """Unlabelled batches are always (sample indices, inputs) of the test split: no labels."""
    d = data()
    dm = TensorTasks(d, {"a": 3, "b": 5}, batch_size=4)
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"a", "b"}
    idx, x = batch["a"]
    assert idx.dtype == torch.long and idx.shape == (4,) and x.shape == (4, 6)
    assert torch.equal(x, d["a"]["test"][0][idx])          # row i of the batch is test sample idx[i]


def test_predict_loaders_are_the_test_loaders_in_task_order():
    d = data()
    dm = TensorTasks(d, {"a": 3, "b": 5}, batch_size=4, eval_batch_size=8)
    loaders = dm.predict_dataloader()
    assert len(loaders) == 2
    for task, loader in zip(("a", "b"), loaders):
        bx, by = map(torch.cat, zip(*loader))
        assert torch.equal(bx, d[task]["test"][0]) and torch.equal(by, d[task]["test"][1])


def test_missing_class_count_or_split_raises():
    d = data()
    with pytest.raises(TvqError, match="no class count for task 'b'"):
        TensorTasks(d, {"a": 3})
    del d["a"]["val"]
    dm = TensorTasks(d, {"a": 3, "b": 5})
    with pytest.raises(TvqError, match="task 'a' has no 'val' split \\(it has train, test\\)"):
        dm.val_dataloader()
    with pytest.raises(TvqError, match="at least one task"):
        TensorTasks({}, {})
