"""Recurring features: what most instance pictures share, which the model will learn as part of the concept.

Training associates whatever recurs in the instance pictures with the concept's tokens (training guide,
"Dataset diversity"): a tie worn in every photo, the same white background, all pictures taken in daylight. Two
sources are checked, per concept (one `N_name` folder):

- tags: a caption tag present on most pictures (other than the concept's own trigger/class tokens);
- picture statistics, from the 64×64 thumbnail `scan` already makes: the border colour (a stand-in for the
  background), overall brightness, and colourlessness.

Regularization pictures are left out: they are meant to be generic, and recurring traits there are the class's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .thumbnail import PictureStats, picture_stats, stats_from_small  # noqa: F401 - computed during scan

if TYPE_CHECKING:
    from .scan import ImageRecord

MIN_SHARE = 0.6          # "most pictures": at least this share of a concept's pictures
MIN_PICTURES = 4         # below this, "most" means little
COLOUR_DISTANCE = 40.0   # RGB distance under which two border colours count as the same background
DARK, BRIGHT = 0.3, 0.7  # mean luma (0..1) thresholds for "dark" / "bright" pictures
GREY_SATURATION = 0.06   # relative chroma below this: a colourless picture


@dataclass
class RecurringFeature:
    """Something most pictures of one concept share."""

    concept: str
    kind: str            # "tag" | "background" | "brightness" | "colour"
    label: str           # the tag, or e.g. "white background (#f4f4f2)"
    count: int
    total: int
    advice: str
    examples: list[str] = field(default_factory=list)   # a few file names that have it

    @property
    def share(self) -> float:
        return self.count / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"concept": self.concept, "kind": self.kind, "label": self.label, "count": self.count,
                "total": self.total, "share": round(self.share, 3), "advice": self.advice,
                "examples": self.examples}


def _by_concept(records: Sequence[ImageRecord]) -> dict[str, list[ImageRecord]]:
    out: dict[str, list[ImageRecord]] = {}
    for r in records:
        if not r.is_regularization and r.usable:
            out.setdefault(r.concept, []).append(r)
    return out


def recurring_tags(records: Sequence[ImageRecord], *, min_share: float = MIN_SHARE,
                   min_pictures: int = MIN_PICTURES, ignore: Sequence[str] = ()) -> list[RecurringFeature]:
    """Caption tags present on at least `min_share` of a concept's pictures.

    The concept's class tokens (the folder name's tokens), the first tag of most captions (the usual trigger
    position) and `ignore` are not reported: they are meant to be on every picture.
    """
    from .captions import caption_first_line, split_tags

    out = []
    for concept, recs in _by_concept(records).items():
        if len(recs) < min_pictures:
            continue
        tag_sets = [{t.lower() for t in split_tags(caption_first_line(r.caption))} for r in recs
                    if r.caption_source in ("sidecar", "filename")]
        if len(tag_sets) < min_pictures:
            continue
        skip = {t.lower() for t in ignore} | {t.lower() for t in split_tags(concept)} | {concept.lower()}
        firsts: dict[str, int] = {}
        for r in recs:
            tags = split_tags(caption_first_line(r.caption))
            if tags:
                firsts[tags[0].lower()] = firsts.get(tags[0].lower(), 0) + 1
        skip |= {t for t, n in firsts.items() if n >= min_share * len(tag_sets)}
        counts: dict[str, int] = {}
        for tags in tag_sets:
            for t in tags:
                counts[t] = counts.get(t, 0) + 1
        for tag, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if tag in skip or n < min_share * len(tag_sets):
                continue
            examples = [r.path.name for r in recs
                        if tag in {t.lower() for t in split_tags(caption_first_line(r.caption))}][:3]
            out.append(RecurringFeature(
                concept, "tag", tag, n, len(tag_sets),
                f"'{tag}' is tagged on {n} of {len(tag_sets)} pictures of '{concept}'. If it is not part of the "
                f"concept, add pictures without it; keeping it tagged where it appears lets the tag, rather than "
                f"the concept's token, take most of it, and lets you prompt it away later.",
                examples))
    return out


def _hex(rgb: Sequence[int]) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def _colour_name(rgb: Sequence[int]) -> str:
    r, g, b = (int(v) for v in rgb)
    hi, lo = max(r, g, b), min(r, g, b)
    if hi - lo < 24:
        return "white" if hi > 215 else "black" if hi < 40 else "grey"
    if r == hi:
        return "red" if g < 0.6 * r else "yellow" if b < 0.6 * r else "pink"
    if g == hi:
        return "green" if r < 0.8 * g else "yellow"
    return "blue" if r < 0.8 * b else "purple"


def recurring_picture_traits(records: Sequence[ImageRecord], *, min_share: float = MIN_SHARE,
                             min_pictures: int = MIN_PICTURES) -> list[RecurringFeature]:
    """Same background colour, same brightness or no colour on most of a concept's pictures (needs stats)."""
    out = []
    for concept, recs in _by_concept(records).items():
        recs = [r for r in recs if isinstance(r.stats, PictureStats)]
        n = len(recs)
        if n < min_pictures:
            continue
        need = min_share * n
        # Background: the most common plain border colour. Vote in coarse colour cells (linear in n), then take
        # everyone within COLOUR_DISTANCE of the winning cell's mean, which also gathers neighbouring cells.
        borders = np.array([r.stats.border_rgb for r in recs], dtype=np.float32)         # [n, 3]
        uniform = np.array([r.stats.border_uniform for r in recs])
        if uniform.sum() >= need:
            cells = (borders[uniform] // 32).astype(np.int32)
            keys, inverse, votes = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
            centre = borders[uniform][inverse.reshape(-1) == int(votes.argmax())].mean(axis=0)
            near = uniform & (np.linalg.norm(borders - centre, axis=1) <= COLOUR_DISTANCE)
            if near.sum() >= need:
                members = [recs[i] for i in np.nonzero(near)[0]]
                rgb = borders[near].mean(axis=0)
                name = _colour_name(rgb)
                out.append(RecurringFeature(
                    concept, "background", f"{name} background ({_hex(rgb)})", len(members), n,
                    f"{len(members)} of {n} pictures of '{concept}' have the same plain {name} background; the "
                    f"model will tend to draw it with the concept. Add pictures on other backgrounds, or caption "
                    f"it (e.g. '{name} background') on the pictures that have it.",
                    [r.path.name for r in members[:3]]))
        for kind, test, word, advice in (
            ("brightness", lambda s: s.luma < DARK, "dark", "add well-lit pictures"),
            ("brightness", lambda s: s.luma > BRIGHT, "bright", "add darker or evening pictures"),
            ("colour", lambda s: s.saturation < GREY_SATURATION, "black-and-white", "add colour pictures, or "
             "caption it 'monochrome' if it is not part of the concept"),
        ):
            members = [r for r in recs if test(r.stats)]
            if len(members) >= need:
                out.append(RecurringFeature(
                    concept, kind, f"{word} pictures", len(members), n,
                    f"{len(members)} of {n} pictures of '{concept}' are {word}: the concept will come out {word} "
                    f"unless prompted otherwise; {advice}.",
                    [r.path.name for r in members[:3]]))
    return out


def recurring_features(records: Sequence[ImageRecord], **kw: Any) -> list[RecurringFeature]:
    """Tags and picture traits shared by most pictures of each concept."""
    tag_kw = {k: v for k, v in kw.items() if k in ("min_share", "min_pictures", "ignore")}
    pic_kw = {k: v for k, v in kw.items() if k in ("min_share", "min_pictures")}
    return recurring_tags(records, **tag_kw) + recurring_picture_traits(records, **pic_kw)
