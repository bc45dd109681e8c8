"""Small ready-made tasks beyond image classification, for ``--task dana.tasks.examples:NAME``.

``gru_copy``: a GRU on a delayed-copy problem (emit the token seen ``delay`` steps
earlier), a sequence task where Adam is the natural single-worker optimizer; a few seconds
an epoch on a CPU. Data are synthetic and seeded, so the task is the same everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dana.tasks.task import Task


class Copier(nn.Module):
    """Embedding → GRU → linear: logits for every position of a token sequence."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(self.gru(self.embed(tokens))[0])


def gru_copy(
    *,
    vocab: int = 8,
    length: int = 24,
    delay: int = 6,
    hidden: int = 48,
    train_sequences: int = 8192,
    eval_sequences: int = 1024,
    seed: int = 1234,
) -> Task:
    """The delayed-copy task: loss is the cross-entropy over the positions from ``delay`` on,
    the metric ``token_error`` the percentage of those tokens predicted wrong."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(
        0, vocab, (train_sequences + eval_sequences, length), generator=generator
    )
    targets = tokens.roll(delay, dims=1)

    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x)[:, delay:].flatten(0, 1), y[:, delay:].flatten())

    def token_error(model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        x, y = batch
        wrong = (model(x)[:, delay:].argmax(-1) != y[:, delay:]).double().mean(1)
        return {"token_error": 100 * wrong.sum()}

    split = train_sequences
    return Task(
        name="gru-copy",
        model=lambda: Copier(vocab, hidden),
        train_data=(tokens[:split], targets[:split]),
        eval_data=(tokens[split:], targets[split:]),
        loss=loss,
        metrics=token_error,
        metric="token_error",
        diverged_metrics={"token_error": 100.0 * (1.0 - 1.0 / vocab)},
        defaults={
            "epochs": 12,
            "lr": 3e-3,
            "batch_size": 64,
            "milestones": (8, 10),
            "decay": 10.0,
            "weight_decay": 0.0,
            "warmup_epochs": 1.0,
        },
    )
