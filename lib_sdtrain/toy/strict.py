"""A strict person's heart reading, learned from pictures labelled by eye.

The toy detector calls far more trained-LoRA samples hearts than a strict person does: on the LoRA subject samples
of toy model v2.1 it says "heart" for about two in three where a person sees one in three (notched blobs with a
blunt bottom, hearts on a stem, bells). Its features still carry what the person looks at, so a linear read-out
of them, fitted to the person's labels, reads much closer to the person (`tools/fit_strict_heart.py` fits it and
records held-out figures; lib_sdtrain/toy/data/README.md has them).

The read-out: the detector's hidden layer (the MLP output, 96 values) plus its heart logit, standardised, then a
logistic regression with an L2 penalty. It belongs to one detector: the file records that detector's SHA-256 and
`StrictHeart.load` refuses another. It is a second figure beside the detector's, not a replacement: it was fitted
to one labeller's criterion ("lobed or notched top, narrowing to a point") on a few hundred pictures, and two
labellers with that same criterion agreed on 40 of 48 pictures (kappa 0.62).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import UserError
from . import world
from .detector import HEADS, WEIGHTS_PATH, Detector, default_detector, to_tensor

STRICT_PATH = Path(__file__).resolve().parent / "data" / "strict_heart.json"
FORMAT = "training-lab toy strict heart reader v1"


def detector_sha256(path: str | Path = WEIGHTS_PATH) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@torch.no_grad()
def features(detector: Detector, images: Sequence[Any], batch_size: int = 256) -> np.ndarray:
    """[N, hidden + 1]: the detector's hidden layer and its heart logit for each picture."""
    net = detector.net.eval()
    heart = HEADS["shape"].index(world.SUBJECT_SHAPE)
    out = []
    for start in range(0, len(images), batch_size):
        hidden = net.hidden(to_tensor(list(images[start:start + batch_size])))
        logit = net.split(net.heads(hidden))["shape"][:, heart:heart + 1]
        out.append(torch.cat([hidden, logit], 1).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, net.heads.in_features + 1))


def fit(x: np.ndarray, y: Sequence[bool], l2: float = 10.0) -> dict[str, Any]:
    """Logistic regression of `y` on standardised `x` (L2 penalty `l2` / n on the weights, none on the bias),
    solved by L-BFGS from zero: deterministic for the same data."""
    y_arr = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y_arr) or len(x) < 2:
        raise UserError("fit needs one feature row per label and at least two rows")
    if y_arr.min() == y_arr.max():
        raise UserError("fit needs both answers among the labels")
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mean) / std, dtype=torch.float64)
    yt = torch.tensor(y_arr)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w * w).sum() / len(yt)
        loss.backward()
        return loss

    opt.step(closure)
    return {"weights": w.detach().tolist(), "bias": float(b.detach()), "mean": mean.tolist(), "std": std.tolist(),
            "l2": l2}


class StrictHeart:
    """The fitted read-out; `calls(images)` says, per picture, whether a strict person would see a heart."""

    def __init__(self, table: dict[str, Any], detector: Detector | None = None) -> None:
        try:
            self.weights = np.asarray(table["weights"], dtype=np.float64)
            self.bias = float(table["bias"])
            self.mean = np.asarray(table["mean"], dtype=np.float64)
            self.std = np.asarray(table["std"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise UserError("the strict heart reader's table lacks weights, bias, mean or std") from None
        if not (self.weights.shape == self.mean.shape == self.std.shape and self.weights.ndim == 1):
            raise UserError("the strict heart reader's weights, mean and std differ in length")
        self.detector = detector or default_detector()
        want = self.detector.net.heads.in_features + 1
        if len(self.weights) != want:
            raise UserError(f"the strict heart reader reads {len(self.weights)} features; this detector gives {want}")
        self.metadata = {k: v for k, v in table.items() if k not in ("weights", "mean", "std")}

    @classmethod
    def load(cls, path: str | Path | None = None, detector: Detector | None = None,
             detector_path: str | Path | None = None) -> StrictHeart:
        """The shipped reader (default), refused unless it was fitted on this detector's weights."""
        path = Path(path) if path is not None else STRICT_PATH
        if not path.is_file():
            raise UserError(f"strict heart reader not found: {path} (fit it with tools/fit_strict_heart.py)")
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError, UnicodeDecodeError):
            raise UserError(f"{path} is not a strict heart reader (not valid JSON)") from None
        if not isinstance(table, dict) or table.get("format") != FORMAT:
            raise UserError(f"{path} is not a strict heart reader ({FORMAT!r})")
        if detector is None:
            detector_path = Path(detector_path) if detector_path is not None else WEIGHTS_PATH
            if table.get("detector_sha256") != detector_sha256(detector_path):
                raise UserError(f"{path} was fitted on another detector than {detector_path.name}; fit it again "
                                "with tools/fit_strict_heart.py")
            detector = default_detector() if detector_path == WEIGHTS_PATH else Detector.load(detector_path)
        return cls(table, detector)

    def probabilities(self, images: Sequence[Any]) -> np.ndarray:
        z = (features(self.detector, images) - self.mean) / self.std @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def calls(self, images: Sequence[Any]) -> list[bool]:
        return [bool(p > 0.5) for p in self.probabilities(images)]


_DEFAULT: StrictHeart | None = None


def default_strict() -> StrictHeart:
    """The shipped reader on the shipped detector, loaded once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = StrictHeart.load()
    return _DEFAULT
