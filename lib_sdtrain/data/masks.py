"""Loss masks kept in files, for masked_loss: which file weights which picture, and how it is read.

Two layouts that users bring from other trainers:

- OneTrainer's sidecar, "<stem>-masklabel.png" beside the picture (found by `scan.scan_dataset`, which never
  takes such a file for a training picture);
- kohya's mask folder (its `conditioning_data_dir` for masked_loss): a picture of the same stem in a folder of
  its own, here either in the same sub-folder as in the dataset (`mask_dir/10_sks dog/a.png` for
  `data/10_sks dog/a.jpg`) or at the top of the mask folder (`mask_dir/a.png`). A mask folder wins over a sidecar.
  The top of the folder serves instance pictures only: class pictures are often numbered as instance pictures
  are (0001.png in both sets), so a class picture takes a mask only from its own sub-folder there
  (`mask_dir/1_dog/0001.png` for `reg/1_dog/0001.png`).

A mask is read as kohya reads it: its red channel (a grey picture's grey), white = weight 1, black = 0, 127 about
0.5. It must show the picture's own frame: the same size, or the same shape at another size (it is then resized
to the picture); anything else is refused before training starts. A picture with a mask file takes its weights
from the file; its own transparency is then only transparency (put on white).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from ..errors import UserError
from .scan import EXIF_TRANSPOSED, ImageRecord, is_picture
from .thumbnail import eight_bit_grey, is_deep_grey

ASPECT_TOLERANCE = 0.01   # a mask saved at another size may round its sides; more than 1 % off is another frame
MAX_MASK_SCALE = 16       # a mask may have at most this many times its picture's pixels (4 times its sides): a
                          # larger one is no mask anyone draws, and decoding it could exhaust memory


def attach_mask_dir(records: list[ImageRecord], mask_dir: str | Path, roots: list[Path]) -> int:
    """Set `record.mask` from kohya's mask folder; returns how many records got one. `roots` are the dataset
    folders (instance, class) whose sub-folder layout the mask folder may repeat."""
    folder = Path(mask_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"mask_dir: {folder} is not a folder")
    by_stem: dict[Path, dict[str, Path]] = {}

    def listing(d: Path) -> dict[str, Path]:
        if d not in by_stem:
            found: dict[str, Path] = {}
            if d.is_dir():
                for p in sorted(d.iterdir()):
                    if is_picture(p):
                        found.setdefault(p.stem, p)
            by_stem[d] = found
        return by_stem[d]

    count = 0
    for rec in records:
        places = []
        for root in roots:
            try:
                places.append(folder / rec.path.parent.relative_to(root))
            except ValueError:
                continue
        if not rec.is_regularization:   # the top serves instance pictures only (see the module's docstring)
            places.append(folder)
        for place in places:
            hit = listing(place).get(rec.path.stem)
            if hit is not None:
                rec.mask = hit
                count += 1
                break
    return count


def mask_problem(rec: ImageRecord) -> str | None:
    """Why `rec`'s mask file cannot weight its picture (unreadable or cut short, far too large, another frame),
    or None. The file is decoded whole (after its size is checked), as the scan decodes pictures: a damaged mask
    is refused before training rather than failing the step that first reads it."""
    return _inspect_mask(rec)[0]


def _inspect_mask(rec: ImageRecord) -> tuple[str | None, bool | None]:
    """(`mask_problem`, whether the mask file is black all over), from one decode of the file; the second is None
    when the file's pixels were not read (no mask file, or a picture of unknown size)."""
    if rec.mask is None:
        return None, None
    if rec.mask.resolve() == rec.path.resolve():
        return (f"the mask of {rec.path.name} is that picture itself ({rec.mask}): mask_dir must be a folder of "
                "masks, not the dataset folder"), None
    known = bool(rec.width and rec.height)    # a record scanned without opening its picture: nothing to match
    try:
        with Image.open(rec.mask) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in EXIF_TRANSPOSED:   # stored turned a quarter
                w, h = h, w
            if not known:                 # no size to bound the decode by: the header is all that is read
                return None, None
            if w * h > MAX_MASK_SCALE * rec.width * rec.height:
                return (f"the mask {rec.mask} is {w}×{h}, more than {MAX_MASK_SCALE} times the pixels of its "
                        f"picture {rec.path.name} ({rec.width}×{rec.height}); save it at the picture's size"), None
            im.load()
            black = weight_channel(im).getextrema()[1] == 0
    except Exception as e:   # noqa: BLE001 - any unreadable file gets the same clear refusal
        return f"the mask {rec.mask} of {rec.path.name} cannot be read as a picture: {e}", None
    if abs(w / h - rec.width / rec.height) > ASPECT_TOLERANCE * rec.width / rec.height:
        turned = ""
        if abs(h / w - rec.width / rec.height) <= ASPECT_TOLERANCE * rec.width / rec.height:
            # the frame turned a quarter: most often a mask drawn on the picture as stored, where the picture's
            # EXIF orientation shows it turned (training, like every viewer, uses the picture upright)
            turned = (" (it has that frame turned a quarter: if the picture is stored turned and shown upright by "
                      "its EXIF orientation, draw the mask on the upright picture)")
        return (f"the mask {rec.mask} is {w}×{h} but its picture {rec.path.name} is {rec.width}×{rec.height}{turned}: "
                "a mask must show the picture's own frame (the same size or shape)"), None
    return None, black


def check_masks(records: list[ImageRecord]) -> list[ImageRecord]:
    """Refuse, before training, any mask file that is not a picture of the same frame as its picture. Returns
    the records that weigh nothing under masked_loss (`weighs_nothing`), judged from the same decode of each mask
    file, so a masked run reads every mask once before training."""
    blank = []
    for rec in records:
        problem, black = _inspect_mask(rec)
        if problem:
            raise UserError(problem)
        if black if black is not None else weighs_nothing(rec):
            blank.append(rec)
    return blank


def weighs_nothing(rec: ImageRecord) -> bool:
    """Whether every loss weight of `rec` is 0 under masked_loss: its mask file is black all over, or (without
    one) its picture is transparent all over. Such a picture trains nothing, and held out it measures 0."""
    from .scan import has_transparency

    if rec.mask is not None:
        with Image.open(rec.mask) as im:
            return weight_channel(im).getextrema()[1] == 0
    if not rec.transparent:
        return False
    with Image.open(rec.path) as im:
        if not has_transparency(im.mode, im.info):
            return False
        return im.convert("RGBA").getchannel("A").getextrema()[1] == 0


def read_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """The weights of a mask file as an "L" picture of `size` (the picture's upright size): its red channel."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        weights = weight_channel(im)
    if weights.size != tuple(size):
        weights = weights.resize(tuple(size), Image.Resampling.BILINEAR)
    return weights


def weight_channel(im: Image.Image) -> Image.Image:
    """0-255 weights ("L") from a mask picture of any mode: its red channel, with 16-bit and 32-bit grey scaled
    from their own range (PIL's plain conversion would clip a 16-bit mid-grey of 32768 to white) and float grey
    read as 0-1 when it stays within it."""
    if is_deep_grey(im.mode):
        return eight_bit_grey(im)
    return im.convert("RGB").getchannel("R")
