"""A linear probe on frozen features: multinomial logistic regression fit by L-BFGS (full
batch, L2-regularised, standardised inputs), scored by accuracy on held-out rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-3, steps: int = 100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, bias, mean, std) of a softmax classifier on standardised `x` (N, D) for labels
    `y` (N,): minimises mean cross-entropy + l2 * |W|^2 to convergence with L-BFGS."""
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mean, std


def probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    l2: float = 1e-3,
) -> float:
    """Accuracy on (test_x, test_y) of the probe fit on (train_x, train_y)."""
    w, b, mean, std = fit_logistic(train_x, train_y, num_classes, l2)
    pred = (((test_x.double() - mean) / std) @ w + b).argmax(1)
    return float((pred == test_y).double().mean())
