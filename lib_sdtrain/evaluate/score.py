"""Cell scoring hooks: a number per picture of a comparison grid.

A scorer is any `Callable[[list[PIL.Image]], list[float]]`. The toy world has one that means something:
the toy detector's probability that the picture shows the concept (toy/detector.py; the subject "zwx" =
P(shape is the heart), the style "zkz" = P(striped)). On prompts with the trigger it measures learning,
on prompts without it, bleeding. Real models have no such detector; their comparison shows pictures only.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..errors import UserError

Scorer = Callable[[Sequence], list]
SCORE_CHOICES = ("auto", "none", "subject", "style")


def toy_concept_scorer(concept: str) -> Scorer:
    """Detector probability of the toy `concept` ("subject" / "style") per picture."""
    if concept not in ("subject", "style"):
        raise UserError(f"unknown toy concept {concept!r}; choose subject or style")
    from ..toy.detector import default_detector

    detector = default_detector()

    def score(images: Sequence) -> list[float]:
        found = detector.detect(list(images))
        return [d.subject if concept == "subject" else d.style for d in found]

    return score


def is_toy_model(name: str) -> bool:
    return name.lower().startswith("toy-")


def choose_scorer(choice: str, prompts: Sequence[str], model_name: str) -> tuple[str, Scorer | None]:
    """(concept name, scorer) for a setting: "none", "subject", "style", or "auto" = the toy concept the
    prompts name ("zwx" → subject, "zkz" → style) when the model is the toy model, else none."""
    if choice not in SCORE_CHOICES:
        raise UserError(f"score must be one of {', '.join(SCORE_CHOICES)}")
    if choice == "none":
        return "", None
    if choice == "auto":
        from ..toy.world import STYLE_TOKEN, SUBJECT_TOKEN

        if not is_toy_model(model_name):
            return "", None
        words = " ".join(prompts).lower().replace(",", " ").split()     # "zwx, a red shape ..."
        if SUBJECT_TOKEN in words:
            choice = "subject"
        elif STYLE_TOKEN in words:
            choice = "style"
        else:
            return "", None
    return choice, toy_concept_scorer(choice)
