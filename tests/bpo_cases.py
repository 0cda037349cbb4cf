"""What the BPO update tests share: an engine that records gradients instead of stepping, and gradient checks."""

import torch
from helpers import rel_err

from r4b.rl import BPOObjective

BIG = 1 << 20  # a token budget no test batch reaches: one micro-batch


class RecordingEngine:
    """An r4b Engine's interface without an optimizer: ``step`` records the accumulated gradients."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = BPOObjective(model)
        self.device = torch.device("cpu")
        self.grads: list[dict[str, torch.Tensor]] = []
        self.backward_calls = 0

    @property
    def unwrapped_module(self) -> torch.nn.Module:
        return self.module

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.backward_calls += 1

    def step(self) -> float:
        grads = {n: grad_or_zeros(p) for n, p in self.module.model.named_parameters()}
        self.grads.append(grads)
        self.module.zero_grad(set_to_none=True)
        return float(torch.cat([g.flatten() for g in grads.values()]).norm())


def grad_or_zeros(p: torch.nn.Parameter) -> torch.Tensor:
    return p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)


def assert_grads_close(actual: dict, expected: dict, tol: float = 1e-5) -> None:
    total = rel_err(
        torch.cat([g.flatten() for g in actual.values()]), torch.cat([g.flatten() for g in expected.values()])
    )
    assert total < tol, total
    for name, grad in expected.items():
        if grad.norm() > 1e-3 * max(g.norm() for g in expected.values()):
            assert rel_err(actual[name], grad) < 10 * tol, name
