"""Learning-rate schedules, evaluated per optimizer step.

`lr = base * warmup(step) * decay`, where decay is one of:
- "plateau": the paper's "divide by 10 when the validation error stops
  improving" (section 5), at most `max_drops` times;
- "step": divide by 10 at fixed epochs;
- "cosine": half-cosine from base to 0 over the run;
- "constant".
The state (for plateau: best error, epochs without improvement, drops) is
saved in checkpoints so a resumed run continues the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class ScheduleState:
    best_error: float = math.inf
    bad_epochs: int = 0
    drops: int = 0


@dataclass
class LRSchedule:
    base_lr: float
    kind: str
    steps_per_epoch: int
    total_epochs: int
    warmup_epochs: float = 0.0
    step_epochs: tuple = (30, 60, 80)
    plateau_patience: int = 5
    plateau_max_drops: int = 3
    state: ScheduleState = field(default_factory=ScheduleState)

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        epoch = step / max(1, self.steps_per_epoch)
        warmup_steps = self.warmup_epochs * self.steps_per_epoch
        warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if self.kind == "plateau":
            decay = 0.1**self.state.drops
        elif self.kind == "step":
            decay = 0.1 ** sum(epoch >= e for e in self.step_epochs)
        elif self.kind == "cosine":
            progress = min(1.0, epoch / max(1e-9, self.total_epochs))
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.kind == "constant":
            decay = 1.0
        else:
            raise ValueError(f"unknown schedule {self.kind!r}")
        return self.base_lr * warmup * decay

    def end_epoch(self, val_error: float) -> bool:
        """Feed the epoch's validation error; True if the lr was just divided."""
        if self.kind != "plateau":
            return False
        state = self.state
        if val_error < state.best_error - 1e-4:
            state.best_error, state.bad_epochs = val_error, 0
            return False
        state.bad_epochs += 1
        if state.bad_epochs >= self.plateau_patience and state.drops < self.plateau_max_drops:
            state.drops += 1
            state.bad_epochs = 0
            return True
        return False

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, data: dict) -> None:
        self.state = ScheduleState(**data)


def apply_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
