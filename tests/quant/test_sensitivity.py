"""accumulate_squared_gradients: exact mean squared gradients of a known loss, no .grad written."""
import pytest
import torch

from tvq_lightning.quant.sensitivity import accumulate_squared_gradients


def test_exact_values_count_and_untouched_grads():
    a = torch.tensor([1.0, -2.0], requires_grad=True)
    b = torch.tensor([[3.0]], requires_grad=True)
    unused = torch.zeros(3, requires_grad=True)
    batches = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(5.0)]

    def loss(i, x):       # d/da = 2 x a, d/db = x
        return x * (a ** 2).sum() + x * b.sum()

    sums, count = accumulate_squared_gradients(loss, [a, b, unused], batches, num_batches=2)
    assert count == 2 and sums.dtype == torch.float64
    # batch x: mean((2 x a)^2) = 4 x^2 mean(a^2) = 10 x^2; mean(x^2) = x^2
    assert sums.tolist() == pytest.approx([10 * (1 + 4), 1 + 4, 0.0])
    assert a.grad is None and b.grad is None


def test_fewer_batches_than_asked_and_none():
    w = torch.ones(2, requires_grad=True)
    sums, count = accumulate_squared_gradients(lambda i, x: (w * x).sum(), [w], [torch.tensor(3.0)], num_batches=8)
    assert count == 1 and sums.tolist() == pytest.approx([9.0])
    sums, count = accumulate_squared_gradients(lambda i, x: (w * x).sum(), [w], [], num_batches=8)
    assert count == 0 and sums.tolist() == [0.0]
    with pytest.raises(ValueError):
        accumulate_squared_gradients(lambda i, x: x, [], [1.0], 1)
