"""Near-duplicate pictures: perceptual hashes, groups, contact sheets, and (only when asked) moving copies away.

Hashes are computed from one 64×64 box-filtered thumbnail (so they barely depend on the picture's size or JPEG
quality):

- pHash (Zauner 2010; the `imagehash` package's variant): 32×32 grey → orthonormal 2-D DCT-II → the 8×8 lowest
  frequencies, one bit per coefficient above their median. It survives resizing, recompression and colour shifts.
- To survive light crops too, pHash is also taken of 9 sub-views of the picture: the centre and each side and
  corner with `CROP` (6.5 %) cut off. A copy cropped by up to ~10 % lines up with one of the views within a few
  percent, where a plain pHash would drift by up to ~20 bits.
- dHash (Krawetz, "Kind of Like That", hackerfactor.com 2013): 9×8 grey, one bit per horizontal gradient sign.
  It is reported, and usable as an extra condition (`dhash_max`), but not used by default: on pictures with flat
  gradients it flips many bits under small colour shifts.

Two pictures are near-duplicates when (1) the smallest Hamming distance between one's full-view pHash and any
view of the other, both ways, is within `PHASH_MAX` (an exact search, `hamming.close_pairs`), and (2) their
low-frequency colour structure agrees: the best correlation, over the same view pairs, of the 8×8 lowest DCT
coefficients per RGB channel (without the DC term, so brightness and colour offsets cancel) is at least
`MIN_CORRELATION`. The second test removes what binary hashes confuse: pictures with one dominant shape in the
same place but other colours or contrast. Groups are the connected components (union-find), so A~B and B~C puts
A, B and C together.

Nothing here deletes anything. `move_to_removed` is the one function that touches the dataset, and only when the
user asks: it moves files (and their caption sidecars) into `<dataset>/_removed/`, which `scan` skips.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import DiskError, UserError

from .hamming import close_pairs
from .hamming import popcount as _popcount  # noqa: F401 - the name tests and older callers use
from .thumbnail import (  # noqa: F401 - the fingerprint lives beside the thumbnail scan makes; names kept here
    CROP, LOW, THUMB, Fingerprint, fingerprint_from_small, picture_fingerprint, small_rgb)

if TYPE_CHECKING:
    from .scan import ImageRecord

# Default thresholds, from tests/test_data_dedupe.py's planted copies (resized, JPEG q 25-50, colour shifts,
# 5-10 % crops and combinations): their pHash distances stay ≤ 10 and 99 % correlate above 0.95, while unrelated
# pictures correlate below 0.8 (rarely up to 0.91, when a few plain shapes sit in the same places). pHash
# distances are even numbers: every pHash has exactly 32 bits set.
PHASH_MAX = 12
MIN_CORRELATION = 0.95


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def hash_distance(a: Fingerprint, b: Fingerprint) -> int:
    """The crop-tolerant pHash distance: min over (full view of one, any view of the other), both ways."""
    return min(min(hamming(a.bits[1], v) for v in b.bits[1:]), min(hamming(b.bits[1], v) for v in a.bits[1:]))


def colour_correlation(a: Fingerprint, b: Fingerprint) -> float:
    """Best correlation of low-frequency colour structure between one's full view and the other's views."""
    ca, cb = a.colour.astype(np.float32), b.colour.astype(np.float32)
    return float(max((ca[0] @ cb.T).max(), (cb[0] @ ca.T).max()))


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicate_pairs(prints: Sequence[Fingerprint], *, phash_max: int = PHASH_MAX,
                         min_correlation: float = MIN_CORRELATION,
                         dhash_max: int | None = None) -> list[tuple[int, int, int, int, float]]:
    """All near-duplicate pairs (i, j, dHash distance, pHash distance, colour correlation) with i < j.

    The pHash search (`hamming.close_pairs`) is exact: a multi-index search where it is faster, else every pair
    vectorised in row blocks; only the pairs it finds are checked for colour correlation (and dHash, if
    `dhash_max`).
    """
    n = len(prints)
    if n < 2:
        return []
    arr = np.array([list(p.bits) for p in prints], dtype=np.uint64)         # [n, 11]
    # pHash distances are whole bits (at most 64): a fractional limit means its floor
    ii, jj, dist = close_pairs(arr[:, 1], np.ascontiguousarray(arr[:, 1:]), math.floor(min(phash_max, 64)))
    out = []
    for i, j, dp in zip(ii.tolist(), jj.tolist(), dist.tolist()):
        dd = hamming(int(arr[i, 0]), int(arr[j, 0]))
        if dhash_max is not None and dd > dhash_max:
            continue
        corr = colour_correlation(prints[i], prints[j])
        if corr >= min_correlation:
            out.append((i, j, dd, dp, round(corr, 4)))
    return out


def group_near_duplicates(prints: Sequence[Fingerprint], **thresholds: Any) -> list[list[int]]:
    """Indices grouped by near-duplicate relation (union-find); only groups of 2+ are returned, sorted."""
    uf = _UnionFind(len(prints))
    for i, j, *_ in near_duplicate_pairs(prints, **thresholds):
        uf.union(i, j)
    groups: dict[int, list[int]] = {}
    for i in range(len(prints)):
        groups.setdefault(uf.find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


@dataclass
class DuplicateGroup:
    """Pictures that look the same. `keep` is a suggestion: the largest picture training can use (then the first
    by name); one it skips (a broken caption, a side under 64 px) only when none of them can be used."""

    paths: list[Path]
    keep: Path
    pairs: list[tuple[str, str, int, int, float]] = field(default_factory=list)  # (a, b, dHash, pHash, corr)

    def to_dict(self) -> dict[str, Any]:
        return {"paths": [str(p) for p in self.paths], "keep": str(self.keep),
                "pairs": [{"a": a, "b": b, "dhash": d1, "phash": d2, "correlation": c}
                          for a, b, d1, d2, c in self.pairs]}


def _file_identity(path: Path) -> tuple:
    """What makes two paths the same file: device and inode (links followed), else the resolved path (a file
    system without inode numbers reports 0 for every file, which must not make them all one)."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino) if st.st_ino else ("path", os.path.realpath(path))


def _has_link(path: Path) -> bool:
    """The path goes through a symbolic link (its own name or one of its folders)."""
    return os.path.realpath(path) != os.path.abspath(path)


def _split_same_files(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[list[Path]]]:
    """One record per file, and the groups of paths that are one file (2+ paths each).

    A picture reached through a link (a linked `N_name` folder, a symbolic or hard link to a picture) is the same
    file, not a copy: it must not be listed as its own near-duplicate, and no path of it may be moved as a copy
    (moving it through a linked folder would move the one real file). The record kept stands for the file: the
    first whose path goes through no symbolic link, else the first.
    """
    by_file: dict[tuple, list[ImageRecord]] = {}
    for r in records:
        by_file.setdefault(_file_identity(r.path), []).append(r)
    single, same = [], []
    for recs in by_file.values():
        single.append(next((r for r in recs if not _has_link(r.path)), recs[0]))
        if len(recs) > 1:
            same.append([r.path for r in recs])
    order = {id(r): i for i, r in enumerate(records)}
    return sorted(single, key=lambda r: order[id(r)]), same


def same_file_groups(records: Sequence[ImageRecord]) -> list[list[Path]]:
    """Paths of the scan that are one picture file reached through a link (2+ paths each), in scan order."""
    return _split_same_files(records)[1]


def find_duplicate_groups(records: Sequence[ImageRecord], **thresholds: Any) -> list[DuplicateGroup]:
    """Near-duplicate groups among scanned records (scan with `fingerprint=True`; others are skipped).

    A file reached under several paths (`same_file_groups`) takes part once, under one of its paths.
    """
    hashed = _split_same_files([r for r in records if r.fingerprint is not None])[0]
    # Byte-identical fingerprints (the same picture saved under several names) are searched once and joined to
    # their first holder: listing every pair of 10,000 copies (50 M) took minutes and gigabytes.
    first: dict[tuple, int] = {}
    holder = [first.setdefault((r.fingerprint.bits, r.fingerprint.colour.tobytes()), i) for i, r in enumerate(hashed)]
    unique = sorted(first.values())
    pairs = [(unique[a], unique[b], *rest) for a, b, *rest in
             near_duplicate_pairs([hashed[i].fingerprint for i in unique], **thresholds)]  # type: ignore[misc]
    min_corr = thresholds.get("min_correlation", MIN_CORRELATION)
    for i, h in enumerate(holder):
        if h != i:
            corr = colour_correlation(hashed[h].fingerprint, hashed[i].fingerprint)
            if corr >= min_corr:   # as the pair search decides (a flat picture has no colour structure: no pair)
                pairs.append((h, i, 0, 0, round(corr, 4)))
    uf = _UnionFind(len(hashed))
    for i, j, *_ in pairs:
        uf.union(i, j)
    members: dict[int, list[int]] = {}
    for i in range(len(hashed)):
        members.setdefault(uf.find(i), []).append(i)
    pair_by_root: dict[int, list[tuple[str, str, int, int, float]]] = {}
    for i, j, d1, d2, corr in pairs:
        pair_by_root.setdefault(uf.find(i), []).append((str(hashed[i].path), str(hashed[j].path), d1, d2, corr))
    out = []
    for root, idx in members.items():
        if len(idx) < 2:
            continue
        recs = [hashed[i] for i in idx]
        keep = min(recs, key=lambda r: (not r.usable, -(r.width * r.height), -r.file_size, str(r.path)))
        out.append(DuplicateGroup([r.path for r in recs], keep.path, pair_by_root.get(root, [])))
    return sorted(out, key=lambda g: str(g.paths[0]))


def contact_sheet(paths: Sequence[Path], out_path: str | Path, *, thumb: int = 192, label: bool = True) -> Path:
    """Write the pictures side by side (each scaled to `thumb` px high) with their file names; returns the path.

    The output goes where the caller says; it is written atomically and never replaces a picture of the group.
    """
    from PIL import Image, ImageDraw

    from ..formats.files import atomic_write

    out_path = Path(out_path)
    if any(out_path.resolve() == Path(p).resolve() for p in paths):
        raise UserError(f"the contact sheet {out_path} would overwrite one of its own pictures")
    tiles = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.draft("RGB", (thumb * 2, thumb * 2))   # JPEG: decode at reduced size
                im = im.convert("RGB")
                w = max(1, round(im.width * thumb / max(1, im.height)))
                tiles.append((Path(p).name, im.resize((min(w, thumb * 3), thumb), Image.Resampling.BICUBIC)))
        except Exception:  # noqa: BLE001 - an unreadable file becomes a grey tile, the sheet still helps
            tiles.append((Path(p).name, Image.new("RGB", (thumb, thumb), (128, 128, 128))))
    pad, text_h = 8, (14 if label else 0)
    width = sum(t.width for _, t in tiles) + pad * (len(tiles) + 1)
    sheet = Image.new("RGB", (width, thumb + text_h + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    x = pad
    for name, t in tiles:
        sheet.paste(t, (x, pad))
        if label:
            draw.text((x, pad + thumb + 2), name[: max(4, t.width // 6)], fill=(0, 0, 0))
        x += t.width + pad
    fmt = "JPEG" if out_path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    return atomic_write(out_path, lambda tmp: sheet.save(tmp, format=fmt))


def contact_sheets(groups: Sequence[DuplicateGroup], out_dir: str | Path, *, thumb: int = 192) -> list[Path]:
    """One sheet per group, `out_dir/dupes-001.png`, ... (the folder is created). A name already taken gets a
    `-1`, `-2`, ... suffix: an earlier run's sheets, or the user's own files, are never replaced."""
    from ..formats.files import unused_path

    out_dir = Path(out_dir)
    return [contact_sheet(g.paths, unused_path(out_dir / f"dupes-{i:03d}.png"), thumb=thumb)
            for i, g in enumerate(groups, 1)]


def glob_escape(text: str) -> str:
    import glob

    return glob.escape(text)


def move_to_removed(paths: Sequence[Path], root: str | Path, *, caption_ext: str = ".txt",
                    keep: Sequence[Path] = (), reg_root: str | Path | None = None) -> list[tuple[Path, Path]]:
    """Move pictures (and their caption sidecars) to `root/_removed/<same relative path>`. Never deletes.

    Only call this when the user explicitly asked to remove files. A name already taken in `_removed/` gets a
    `-1`, `-2`, ... suffix, so nothing is ever overwritten. `keep`: the pictures that stay; a path that is the
    very file one of them is (a kept symbolic link's target) stays too. `reg_root`: a regularization folder
    outside the dataset; its copies go to its own `_removed/`. Returns (from, to) for every moved file.
    """
    from ..formats.files import disk_error_reason, unused_path
    from .scan import IMAGE_EXTENSIONS, MASK_LABEL, REMOVED_DIR, caption_path

    roots = [Path(root).resolve()] + ([Path(reg_root).resolve()] if reg_root is not None else [])
    # Only the folder is resolved: a picture that is a symbolic link is moved as the link, never its target (which
    # may lie outside the dataset, or be the picture kept). Every path is checked before anything moves.
    located = []
    for p in paths:
        p = Path(p).parent.resolve() / Path(p).name
        inside = [r for r in roots if r in p.parents]
        if not inside:
            raise UserError(f"{p} is not inside the dataset {roots[0]}; refusing to move it")
        located.append((p, inside[0]))
    kept = {Path(k).resolve() for k in keep}
    moved: list[tuple[Path, Path]] = []
    for p, root in located:
        if REMOVED_DIR in p.relative_to(root).parts or (p.resolve() in kept and not p.is_symlink()):
            continue
        cap = caption_path(p, caption_ext)
        # a sidecar shared with another picture of the same name (a.png + a.jpg) stays for that picture
        shared = any(q != p and q.stem == p.stem and q.suffix.lower() in IMAGE_EXTENSIONS
                     for q in p.parent.glob(glob_escape(p.stem) + ".*"))
        masks = [q for q in p.parent.glob(glob_escape(p.stem + MASK_LABEL) + ".*")   # its OneTrainer mask goes too
                 if q.suffix.lower() in IMAGE_EXTENSIONS] if not shared else []
        for src in ((p,) if shared else (p, cap, *masks)):
            if not (src.is_file() or src.is_symlink()):
                continue
            dest = unused_path(root / REMOVED_DIR / src.relative_to(root))
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(os.fspath(src), os.fspath(dest))
            except OSError as e:     # a read-only folder: said in one line, with what was moved before it
                _take_back_copy(src, dest)
                done = (f"{len(moved)} files were moved to {REMOVED_DIR}/ before it" if moved
                        else "nothing was moved")
                raise DiskError(f"cannot move {src} to {dest}: {disk_error_reason(e) or e}; {done}") from None
            moved.append((src, dest))
    return moved


def _take_back_copy(src: Path, dest: Path) -> None:
    """Where a rename is refused, shutil.move copies and then deletes the original: when the delete failed too, the
    copy (at a name that was free, so ours) is removed, and the file is in one place only."""
    if (src.is_file() or src.is_symlink()) and (dest.is_file() or dest.is_symlink()):
        try:
            dest.unlink()
        except OSError:
            pass
