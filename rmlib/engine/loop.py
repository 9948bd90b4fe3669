"""The one training loop of rmlib: backbones and transforms alike run their epochs here.

A caller brings the batches of each epoch and the loss of a batch; the loop takes the
optimisation steps, keeps the running sums, shows a bar, and after each epoch refuses a
non-finite loss, appends a record to the history and calls the caller's hook (to save a
checkpoint, print, or add fields).

The running sums stay on the loss's device and are read once per epoch (and, when a
progress bar is shown, every `POSTFIX_EVERY` steps): a GPU is never made to wait for the
host inside an epoch.

Explained in the book: book/models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from rmlib import RmlibError

POSTFIX_EVERY = 50  # steps between progress-bar readings of the running sums (host syncs)


@dataclass
class Optimisation:
    """An optimizer, its schedule (stepped every batch) and what to say if the loss
    diverges (`{epoch}` is filled in)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    advice: str
    average: AveragedModel | None = None  # a weight average, updated after every step
    model: torch.nn.Module | None = None  # what `average` averages

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.average is not None:
            self.average.update_parameters(self.model)

    def refuse(self, loss_sum: float, epoch: int) -> None:
        """Stop with the advice if an epoch's loss was not finite (checked once an epoch,
        before its checkpoint is written, so a diverged run never overwrites a good one)."""
        if not torch.isfinite(torch.tensor(loss_sum)):
            raise RmlibError(f"{self.advice.format(epoch=epoch + 1)} (loss {loss_sum})")

    def state(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        if self.average is not None:
            state["average"] = self.average.state_dict()
        return state

    def load(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])


# The loss of one batch, the number of items it averaged, and sums to report per item
# (e.g. {"train_acc": correct predictions}, as numbers or tensors on the loss's device).
StepResult = tuple[torch.Tensor, int, dict[str, float | torch.Tensor]]


def train_epochs(epochs: range, batches: Callable[[int], Iterable[Any]],
                 loss_of: Callable[[Any], StepResult], opt: Optimisation, history: list[dict],
                 desc: str, total: int, progress: bool = True,
                 end_epoch: Callable[[int, dict, int], None] | None = None) -> list[dict]:
    """Run `epochs` (indices into `total`), appending one record per epoch to `history`:
    {"epoch", "loss", <per-item sums>, "seconds"}; `end_epoch(epoch, record, items)` follows."""
    from tqdm.auto import tqdm

    for epoch in epochs:
        t0, seen, sums = time.time(), 0, {}
        bar = tqdm(batches(epoch), desc=f"{desc} epoch {epoch + 1}/{total}", disable=not progress,
                   leave=False, mininterval=2.0)
        for step, batch in enumerate(bar):
            loss, count, extras = loss_of(batch)
            opt.step(loss)
            for name, value in {"loss": loss.detach() * count, **extras}.items():
                sums[name] = sums.get(name, 0) + value
            seen += count
            if progress and step % POSTFIX_EVERY == 0:
                bar.set_postfix({k: f"{float(v) / seen:.3f}" for k, v in sums.items()})
        bar.close()
        totals = {k: float(v) for k, v in sums.items()}  # the epoch's one read of the device
        opt.refuse(totals.get("loss", 0.0), epoch)
        record = {"epoch": epoch + 1, **{k: v / max(seen, 1) for k, v in totals.items()},
                  "seconds": time.time() - t0}
        history.append(record)
        if end_epoch is not None:
            end_epoch(epoch, record, seen)
    return history
