"""Advice next to a comparison, from what was measured on it, the run's loss log and its dataset.

Rules (each fires only on a measured number, which the advice quotes):
- bleeding: the concept shows in pictures whose prompt lacks the trigger. Measured by the concept score on
  control prompts against the base model's (toy world), else by how much the control pictures changed from
  the base model relative to the trigger pictures. → more or better regularization (class) pictures.
- over-training: burned pictures (many more clipped pixels than the base model), copy-like pictures (cells of
  different prompts or seeds reproducing the same training picture, found with the dataset tools'
  near-duplicate test), or a collapsing loss (the loop's over-training alarm, train/monitor.py, replayed on
  loss.csv). → an earlier epoch, and look for duplicate pictures in the dataset.
- recurring feature: something most training pictures share (data/features.py); where it can be seen in
  pixels (a background colour, brightness, no colour) its share in the generated pictures is measured.
  → the pictures or tags that carry it.
- no gain: no save's concept score beats the base model's by a margin (NEAR_BEST) → said plainly, no choice.
- choice: the earliest epoch that reaches (nearly) the best concept score without the problems above.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

BLEED_SCORE_RISE = 0.25      # control-prompt concept score above the base model's by this much = bleeding
BLEED_CHANGE_RATIO = 0.6     # control pictures changed at least this share of what trigger pictures changed
BLEED_MIN_CHANGE = 0.05      # ... and by at least this mean absolute pixel difference (0..1)
BURN_CLIP_RISE = 0.15        # share of clipped pixels above the base model's by this much = burned
COPY_SHARE = 0.5             # share of trigger cells that reproduce a training picture
FEATURE_SHARE_RISE = 0.3     # recurring feature in this much more of the pictures than on the base model
FIRM_PICTURES = 4            # fewer trigger pictures a row than this: the no-gain advice says its reading is rough
NEAR_BEST = 0.05             # "nearly the best" concept score


@dataclass
class Advice:
    kind: str                 # "bleeding" | "overtraining" | "feature" | "no_gain" | "choice"
    message: str
    epochs: list[int] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "epochs": self.epochs, "evidence": self.evidence}


# ---- measurements ---------------------------------------------------------------------------------
def _arr(im) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def clipped_share(im) -> float:
    """Share of pixels with a channel at (almost) 0 or 255: burned pictures clip."""
    a = _arr(im)
    return float(((a <= 2 / 255) | (a >= 253 / 255)).any(axis=-1).mean())


def picture_change(a, b) -> float:
    """Mean absolute pixel difference (0..1) of two pictures of the same size."""
    return float(np.abs(_arr(a) - _arr(b)).mean())


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else None


def _row_label(comp, r: int) -> str:
    return comp.rows[r].label


def _epoch(comp, r: int) -> int | None:
    return comp.rows[r].epoch


def measure_rows(comp, training_prints: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """Per row: concept scores, bleeding change ratio, clipped share, copy-likeness (see module docstring)."""
    from ..data.dedupe import near_duplicate_pairs, picture_fingerprint

    base = 0 if comp.has_base else None
    trig = [c for c, col in enumerate(comp.cols) if not col.control]
    ctrl = [c for c, col in enumerate(comp.cols) if col.control]
    out = []
    for r in range(len(comp.rows)):
        cells = comp.images[r]
        m: dict[str, Any] = {"row": _row_label(comp, r), "epoch": _epoch(comp, r),
                             "score_trigger": comp.mean_score(r, False), "score_control": comp.mean_score(r, True),
                             "clipped": _mean([clipped_share(cells[c]) for c in range(len(cells)) if cells[c]])}
        if base is not None and r != base:
            bc = comp.images[base]
            ch_t = _mean([picture_change(cells[c], bc[c]) for c in trig if cells[c] and bc[c]])
            ch_c = _mean([picture_change(cells[c], bc[c]) for c in ctrl if cells[c] and bc[c]])
            m["change_trigger"], m["change_control"] = ch_t, ch_c
        if training_prints:
            prints = [picture_fingerprint(cells[c]) for c in trig if cells[c] is not None]
            n = len(prints)
            pairs = near_duplicate_pairs(prints + list(training_prints))
            matched: dict[int, int] = {}
            for i, j, *_ in pairs:
                if i < n <= j:
                    matched.setdefault(i, j - n)
            by_picture: dict[int, set[int]] = {}
            for cell, pic in matched.items():
                by_picture.setdefault(pic, set()).add(cell)
            repeated = sum(len(v) for v in by_picture.values() if len(v) >= 2)
            m["copy_share"] = len(matched) / n if n else 0.0
            m["copy_repeated"] = repeated / n if n else 0.0
        out.append(m)
    return out


def loss_collapse(loss) -> dict[str, Any] | None:
    """Replay the loop's loss monitor on a loss log: the step (and epoch) of its over-training alarm, if any."""
    if loss is None or len(loss) < 10:
        return None
    from ..train.monitor import LossMonitor

    mon = LossMonitor()
    for i, value in enumerate(loss.losses):
        if mon.update(value) == "overtraining":
            return {"step": loss.steps[i], "epoch": loss.epochs[i], "early_ema": mon.early, "ema": mon.ema}
    return None


def _feature_test(feature) -> Any:
    """A per-picture test for a recurring feature that shows in pixels; None for tags."""
    from ..data.features import COLOUR_DISTANCE, DARK, BRIGHT, GREY_SATURATION, picture_stats

    if feature.kind == "background":
        m = re.search(r"#([0-9a-fA-F]{6})", feature.label)
        if not m:
            return None
        rgb = np.array([int(m.group(1)[i:i + 2], 16) for i in (0, 2, 4)], dtype=np.float32)

        def test(im) -> bool:
            s = picture_stats(im)
            return s.border_uniform and float(np.linalg.norm(np.array(s.border_rgb, np.float32) - rgb)) <= COLOUR_DISTANCE
        return test
    if feature.kind == "brightness":
        dark = feature.label.startswith("dark")
        return lambda im: (picture_stats(im).luma < DARK) if dark else (picture_stats(im).luma > BRIGHT)
    if feature.kind == "colour":
        return lambda im: picture_stats(im).saturation < GREY_SATURATION
    return None


# ---- the rules ------------------------------------------------------------------------------------
def advise(comp, *, loss=None, features: Sequence[Any] | None = None, duplicates: Sequence[Any] | None = None,
           training_prints: Sequence[Any] | None = None, data_dir: str = "") -> list[Advice]:
    """Advice for a rendered comparison (see the module docstring). Inputs other than `comp` are optional."""
    rows = measure_rows(comp, training_prints)
    base = rows[0] if comp.has_base else None
    # saves with at least one picture: a row left blank (weights not finite, or a comparison stopped before it)
    # has nothing to measure, so no advice names it, as a save to use or as an earlier one
    file_rows = [i for i in range(len(rows)) if comp.rows[i].file is not None
                 and any(im is not None for im in comp.images[i])]
    out: list[Advice] = []
    flagged: dict[int, list[str]] = {}

    # bleeding
    bleed = []
    for i in file_rows:
        m = rows[i]
        if m["score_control"] is not None and base is not None and base["score_control"] is not None:
            rise = m["score_control"] - base["score_control"]
            if rise >= BLEED_SCORE_RISE:
                bleed.append((i, f"{comp.concept} score {base['score_control']:.2f} → {m['score_control']:.2f}"))
        elif m.get("change_control") is not None and m.get("change_trigger"):
            ratio = m["change_control"] / m["change_trigger"]
            m["bleed_ratio"] = ratio
            if ratio >= BLEED_CHANGE_RATIO and m["change_control"] >= BLEED_MIN_CHANGE:
                bleed.append((i, f"control pictures changed {m['change_control']:.3f} vs {m['change_trigger']:.3f} "
                                 f"for trigger pictures (ratio {ratio:.2f})"))
    if bleed:
        first, why = bleed[0]
        for i, _ in bleed:
            flagged.setdefault(i, []).append("bleeding")
        out.append(Advice(
            "bleeding",
            f"The concept shows without its trigger from {_row_label(comp, first)} ({why} on prompts without the "
            f"trigger). Add more or better regularization (class) pictures: pictures of the class word in many "
            f"variations, captioned without the trigger (dataset classgen can render them with the base model); "
            f"or use an earlier epoch.",
            [e for e in (_epoch(comp, i) for i, _ in bleed) if e is not None], {"rows": [rows[i] for i, _ in bleed]}))

    # over-training: burned, copy-like, collapsing loss
    reasons: list[str] = []
    over_rows = []
    ref_clip = base["clipped"] if base is not None else (rows[file_rows[0]]["clipped"] if file_rows else None)
    for i in file_rows:
        m, why = rows[i], []
        if ref_clip is not None and m["clipped"] is not None and m["clipped"] - ref_clip >= BURN_CLIP_RISE:
            why.append(f"burned: {m['clipped']:.0%} clipped pixels vs {ref_clip:.0%}")
        if m.get("copy_share", 0) >= COPY_SHARE and m.get("copy_repeated", 0) > 0:
            why.append(f"copy-like: {m['copy_share']:.0%} of the pictures reproduce a training picture, "
                       f"{m['copy_repeated']:.0%} the same one for different prompts or seeds")
        if why:
            over_rows.append(i)
            flagged.setdefault(i, []).append("overtraining")
            reasons.append(f"{_row_label(comp, i)}: " + "; ".join(why))
    collapse = loss_collapse(loss)
    if collapse:
        reasons.append(f"the smoothed loss collapsed to {collapse['ema']:.4g} (from {collapse['early_ema']:.4g}) at "
                       f"step {collapse['step']}, epoch {collapse['epoch']}")
        for i in file_rows:   # saves made after the alarm
            step, e = comp.rows[i].step, _epoch(comp, i)
            if (step is not None and step >= collapse["step"]) or (step is None and e is not None
                                                                    and e >= collapse["epoch"]):
                flagged.setdefault(i, []).append("overtraining")
    if reasons:
        earliest = min([i for i, f in flagged.items() if "overtraining" in f], default=None)
        earlier = [i for i in file_rows if earliest is not None and i < earliest]
        pick = f"use {_row_label(comp, earlier[-1])} or earlier" if earlier else "use an earlier epoch (save more often)"
        dup = ""
        if duplicates is not None:
            dup = (f" The dataset has {len(duplicates)} group(s) of near-duplicate pictures "
                   f"(e.g. {', '.join(p.name for p in duplicates[0].paths[:3])}): remove or vary them."
                   if duplicates else " The dataset tools found no near-duplicates in it.")
        out.append(Advice("overtraining", f"Signs of over-training ({'; '.join(reasons)}). {pick[0].upper()}{pick[1:]}, "
                                          f"and look for duplicate pictures in the dataset.{dup}",
                          sorted({e for e in (_epoch(comp, i) for i in over_rows) if e is not None}),
                          {"collapse": collapse, "duplicate_groups": len(duplicates) if duplicates is not None else None}))

    # recurring features
    trig = [c for c, col in enumerate(comp.cols) if not col.control]
    check_row = file_rows[-1] if file_rows else None
    for f in features or []:
        test = _feature_test(f)
        evidence: dict[str, Any] = {"feature": f.to_dict()}
        measured = ""
        if test is not None and check_row is not None and trig:
            share = _mean([float(test(comp.images[check_row][c])) for c in trig if comp.images[check_row][c]])
            base_share = (_mean([float(test(comp.images[0][c])) for c in trig if comp.images[0][c]])
                          if comp.has_base else 0.0)
            evidence.update(share=share, base_share=base_share)
            if share is None or share - (base_share or 0.0) < FEATURE_SHARE_RISE:
                continue   # measurable, and not learned: no advice
            measured = (f" It shows in {share:.0%} of the pictures of {_row_label(comp, check_row)} "
                        f"(base model {base_share or 0:.0%}).")
        carriers = f" Pictures that carry it: {', '.join(f.examples)}." if f.examples else ""
        out.append(Advice("feature", f"Recurring feature '{f.label}' ({f.count} of {f.total} training pictures)."
                                     f"{measured} {f.advice}{carriers}", [], evidence))

    # no gain: the base model scores as well as every save (the run learned nothing measurable)
    scored_files = [i for i in file_rows if rows[i]["score_trigger"] is not None]
    if base is not None and base["score_trigger"] is not None and scored_files:
        best_i = max(scored_files, key=lambda i: rows[i]["score_trigger"])
        best, ref = rows[best_i]["score_trigger"], base["score_trigger"]
        if best - ref < NEAR_BEST:
            n = sum(1 for c, col in enumerate(comp.cols) if not col.control and comp.images[best_i][c] is not None)
            verdict = "No save beats the base model" if best <= ref else "No save clearly beats the base model"
            pictures = "1 picture" if n == 1 else f"{n} pictures"
            # a reading of one or two pictures a row is one draw, not a verdict on the run
            rough = (f" With {pictures} per row this is a rough reading: add seeds or prompts for a firmer one."
                     if n < FIRM_PICTURES else "")
            out.append(Advice(
                "no_gain",
                f"{verdict} on the {comp.concept} concept: base model {ref:.2f}, best save "
                f"{_row_label(comp, best_i)} {best:.2f} (mean of {pictures} per row with the trigger). The run "
                f"has not learned the concept: train longer or with a higher learning rate, check that the "
                f"captions hold the trigger, or use more pictures; none of these saves is worth keeping for it."
                f"{rough}",
                [], {"base_score": ref, "best_score": best, "best_row": _row_label(comp, best_i), "pictures": n}))
            return out

    # choice
    ok = [i for i in file_rows if i not in flagged]
    if ok:
        scored = [i for i in ok if rows[i]["score_trigger"] is not None]
        if scored:
            best = max(rows[i]["score_trigger"] for i in scored)
            pick_i = next(i for i in scored if rows[i]["score_trigger"] >= best - NEAR_BEST)
            msg = (f"{_row_label(comp, pick_i)} is the earliest save with (nearly) the best concept score "
                   f"({rows[pick_i]['score_trigger']:.2f}; best {best:.2f}) and no warning above.")
        else:
            pick_i = ok[-1]
            msg = f"{_row_label(comp, pick_i)} is the latest save with no warning above; check its pictures."
        out.append(Advice("choice", msg, [e for e in [_epoch(comp, pick_i)] if e is not None], {"row": rows[pick_i]}))
    elif file_rows:
        out.append(Advice("choice", "Every save has a warning above; retrain with the changes they suggest "
                                    "(or a lower learning rate / fewer repeats).", []))
    return out


def dataset_inputs(run) -> dict[str, Any]:
    """Features, duplicate groups and fingerprints of the run's dataset (empty when its folder is gone)."""
    from pathlib import Path

    from ..errors import UserError

    cfg = run.config
    data = getattr(cfg, "data", "") if cfg is not None else ""
    if not data or not Path(data).is_dir():
        return {}
    from ..data.dedupe import find_duplicate_groups
    from ..data.features import recurring_features
    from ..data.scan import scan_dataset

    try:
        report = scan_dataset(data, caption_ext=getattr(cfg, "caption_ext", ".txt"), fingerprint=True, workers=1)
    except UserError:
        return {}
    instance = [r for r in report.usable if not r.is_regularization]
    return {"features": recurring_features(report.records), "duplicates": find_duplicate_groups(instance),
            "training_prints": [r.fingerprint for r in instance if r.fingerprint is not None], "data_dir": data}
