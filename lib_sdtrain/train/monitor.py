"""Loss bookkeeping: smoothed loss, CSV and TensorBoard logs, and divergence / over-training warnings.

Diffusion losses are noisy (each step draws new timesteps), so every signal here works on an exponential
moving average (EMA) and on windows of it, never on single steps.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path


class LossLog:
    """Writes `loss.csv` (always) and TensorBoard events (if a writer library is installed).

    `resume=True` continues the files of the run being resumed; otherwise the run starts fresh ones: a run
    folder that already has logs belongs to a run the user chose to overwrite (`check_free` refuses otherwise),
    and its steps must not be mixed into the new run's. `purge_step`: a resumed run's first step; TensorBoard
    hides events a killed run wrote from there on (loss.csv is trimmed by `state.trim_loss_csv`).
    """

    def __init__(self, folder: Path, tensorboard: bool = True, resume: bool = False,
                 purge_step: int | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = folder / "loss.csv"
        self.tb_dir = folder / "tensorboard"
        if not resume and self.tb_dir.is_dir():
            for old in self.tb_dir.glob("events.out.tfevents.*"):
                old.unlink()
        new = not resume or not self.csv_path.exists()
        self._fh = open(self.csv_path, "w" if new else "a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._fh)
        if new:
            self._csv.writerow(["step", "epoch", "loss", "loss_ema", "lr", "time"])
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                try:
                    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
                except ImportError:
                    SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(self.tb_dir), purge_step=purge_step)

    def write(self, step: int, epoch: int, loss: float, ema: float | None, lr: float) -> None:
        """One row; `ema` is None when no finite loss was seen yet (a first step that diverged)."""
        ema_text = "" if ema is None else f"{ema:.6g}"
        self._csv.writerow([step, epoch, f"{loss:.6g}", ema_text, f"{lr:.6g}", f"{time.time():.3f}"])
        self._fh.flush()
        if self.tb is not None:
            self.tb.add_scalar("loss/step", loss, step)
            if ema is not None:
                self.tb.add_scalar("loss/ema", ema, step)
            self.tb.add_scalar("lr", lr, step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """More figures of a step, to TensorBoard only (loss.csv keeps its columns)."""
        if self.tb is not None:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)

    def image(self, tag: str, pil_image, step: int) -> None:
        if self.tb is not None:
            import numpy as np

            self.tb.add_image(tag, np.asarray(pil_image).transpose(2, 0, 1), step)

    def close(self) -> None:
        self._fh.close()
        if self.tb is not None:
            self.tb.close()


class LossMonitor:
    """EMA of the loss and two alarms.

    - divergence: a non-finite loss, or a slow average of the loss staying above `rise_factor` × its lowest value
      for `patience` steps in a row (the run is going somewhere bad; stop and keep the last good save). The
      average is an EMA over about `slow_window` steps of log(loss), i.e. a geometric mean: a per-step diffusion
      loss is heavy-tailed (it depends on the drawn timestep; on the toy model log(loss) has a spread of about
      0.7), so an arithmetic EMA over ~10 steps dips far below its mean by chance, and a rise measured against
      such a dip stopped healthy runs (83 of 100 simulated 3,000-step runs). A real divergence (a learning rate
      far too high) lifts the loss several-fold for good, which this average follows within about
      `slow_window` steps.
    - over-training: from step 8 × `slow_window` on, the geometric mean of the loss over the last eighth of the
      steps (at least `slow_window` steps) fell below `collapse_ratio` × the same mean at half the steps so far,
      and is still falling (its fall over the last quarter of the steps is at least half its fall over the
      quarter before): the model keeps fitting the pictures ever closer, long after the first adaptation
      (compare earlier epochs). A first fall that settles slows down, so the "still falling" half keeps it
      quiet; a lasting collapse keeps falling. The former rule (the 10-step EMA below 0.3 × its value at step 20,
      its last 20-step fall larger than the one before) fired on healthy runs whose loss merely settles after a
      fast start: in 100 of 100 simulated runs with a fast first fall, 36 of 100 with a 2× fall over 300 steps,
      and on a style LoRA of the toy world at step 397 of 1,800 while it was still learning. This one: none of
      100 in those and in level runs, 1 of 100 with a 10× fall over ~300 steps; a loss halving every 200 steps
      after 500 level ones is caught at steps 835-987, one halving every 400 steps from the start at 1,113-1,517.
    """

    def __init__(self, beta: float = 0.9, warmup: int = 20, rise_factor: float = 3.0, collapse_ratio: float = 0.3,
                 slow_window: int = 50, patience: int = 10) -> None:
        self.beta, self.warmup, self.rise_factor, self.collapse_ratio = beta, warmup, rise_factor, collapse_ratio
        self.slow_window, self.patience = max(1, slow_window), patience
        self.slow_beta = 1.0 - 1.0 / self.slow_window
        self.ema: float | None = None
        self.slow: float | None = None
        self.count = 0
        self.best = math.inf          # the lowest slow average (of log loss) after warm-up
        self.above = 0                # steps in a row with the slow average above rise_factor × its lowest
        self.early: float | None = None   # the EMA at the end of the warm-up (evaluate.advice reports it)
        self.reference: float | None = None   # the loss (window mean) at half the steps, when over-training is called
        self.log_sums: list[float] = [0.0]    # running sums of log(loss): window means in O(1)
        self.overtraining_warned = False

    def update(self, loss: float) -> str | None:
        """Add one step's loss; return "diverged", "overtraining" or None."""
        if not math.isfinite(loss):
            return "diverged"
        self.count += 1
        self.ema = loss if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss
        log_loss = math.log(max(loss, 1e-30))
        keep = min(self.slow_beta, 1.0 - 1.0 / self.count)   # a plain mean until slow_window steps are in
        self.slow = log_loss if self.slow is None else keep * self.slow + (1 - keep) * log_loss
        self.log_sums.append(self.log_sums[-1] + log_loss)
        if self.count == self.warmup:
            self.early = self.ema
        if self.count >= max(self.warmup, self.slow_window):
            self.best = min(self.best, self.slow)
            self.above = self.above + 1 if self.slow > self.best + math.log(self.rise_factor) else 0
            if self.above >= self.patience:
                return "diverged"
        t = self.count
        if not self.overtraining_warned and t >= 8 * self.slow_window:
            # windows of an eighth of the steps so far (at least slow_window): the half-way window ends at step
            # t/2 >= 4 windows in, past a fast start; longer runs get longer, quieter windows
            w = max(self.slow_window, t // 8)

            def mean_to(i: int) -> float:                     # mean log(loss) of steps i-w+1 .. i
                return (self.log_sums[i] - self.log_sums[i - w]) / w

            half, three_q, now = mean_to(t // 2), mean_to((3 * t) // 4), mean_to(t)
            older, recent = three_q - half, now - three_q      # log falls (negative = falling)
            if now - half < math.log(self.collapse_ratio) and recent <= 0.5 * older < 0:
                self.overtraining_warned = True
                self.reference = math.exp(half)
                return "overtraining"
        return None
