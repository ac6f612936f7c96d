"""CLIP's byte-level BPE tokenizer, producing the same ids A1111 feeds its text encoders.

A1111 v1.10.1 tokenizes with two implementations of the same CLIP BPE:
- SD1 and SDXL's first encoder (CLIP ViT-L): transformers' slow `CLIPTokenizer` with ftfy
  (`sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords.tokenize`); specials spelled `<|startoftext|>`/`<|endoftext|>`.
- SD2 and SDXL's second encoder (OpenCLIP ViT-H / bigG): open_clip's `SimpleTokenizer`
  (`sd_hijack_open_clip.FrozenOpenCLIPEmbedder*WithCustomWords.tokenize`); specials spelled
  `<start_of_text>`/`<end_of_text>`, and the text is HTML-unescaped twice after ftfy.
Both give identical ids except for those two details, which the `flavor` argument selects.

The vocabulary is the `bpe_simple_vocab_16e6.txt.gz` file shipped inside open-clip-torch. It is located with
`importlib.util.find_spec`, which does not import open_clip: importing it pulls in torchvision, and PyPI's
torchvision wheels fail to import next to a CPU-only torch (deps.md §3, §7). A Hugging Face tokenizer folder
(`vocab.json` + `merges.txt`, as A1111's SD1 model and our toy model carry) works too.

Padding, per A1111 (`FrozenCLIPEmbedderWithCustomWords.__init__`: id_pad = id_end;
`FrozenOpenCLIPEmbedder*WithCustomWords.__init__`: id_pad = 0): SD1/SDXL-1 pad with the end id 49407,
SD2/SDXL-2 pad with 0 after the first end token.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from ..errors import UserError

START_ID = 49406
END_ID = 49407
VOCAB_SIZE = 49408
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"

Flavor = Literal["open_clip", "hf"]
FLAVORS: tuple[str, ...] = ("open_clip", "hf")

# 49408 ids = 256 byte symbols + the same 256 ending a word ("</w>") + 48894 merges + 2 specials.
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2
_SPECIALS = {  # how each implementation spells start/end when they appear literally in a prompt
    "open_clip": ("<start_of_text>", "<end_of_text>"),
    "hf": ("<|startoftext|>", "<|endoftext|>"),
}
_HF_SPECIALS = _SPECIALS["hf"]
_CACHE_LIMIT = 200_000  # BPE results kept per tokenizer; prompts repeat a small vocabulary of words


def _byte_symbols() -> tuple[list[str], dict[int, str]]:
    """The 256 unicode stand-ins for bytes, in CLIP's vocabulary order (GPT-2's reversible byte mapping).

    Printable Latin-1 bytes stand for themselves; the others (controls, space, soft hyphen) get code points
    from 256 upwards so that no BPE symbol is whitespace. The order of this list is the order of ids 0..255.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    by_byte = {b: chr(b) for b in printable}
    by_byte.update({b: chr(256 + i) for i, b in enumerate(others)})
    return [by_byte[b] for b in (*printable, *others)], by_byte


_SYMBOLS, _BYTE_TO_SYMBOL = _byte_symbols()
_SYMBOL_TO_BYTE = {s: b for b, s in _BYTE_TO_SYMBOL.items()}


def find_bpe_vocab() -> Path | None:
    """The BPE file bundled with open-clip-torch, found without importing open_clip (None if not installed)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / BPE_FILE_NAME
        if path.is_file():
            return path
    return None


class _Vocabulary:
    """Token → id table and merge ranks of one vocabulary file (shared by all tokenizers reading that file)."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], source: str):
        self.encoder = encoder
        self.decoder = {i: t for t, i in encoder.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.source = source


def _read_clip_bpe(path: Path) -> _Vocabulary:
    """open_clip/OpenAI layout: one header line, then merges; the vocabulary is derived from the merges."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    lines = raw.decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + _N_MERGES]]
    if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
        raise UserError(f"{path} is not a CLIP BPE merges file (expected {_N_MERGES} merge lines)")
    tokens = [*_SYMBOLS, *(s + "</w>" for s in _SYMBOLS), *("".join(m) for m in merges), *_HF_SPECIALS]
    return _Vocabulary({t: i for i, t in enumerate(tokens)}, merges, str(path))  # type: ignore[arg-type]


def _read_hf_folder(vocab_json: Path, merges_txt: Path) -> _Vocabulary:
    """Hugging Face layout (`vocab.json` + `merges.txt`, `#version` header); ids come from vocab.json."""
    try:
        encoder = json.loads(vocab_json.read_text(encoding="utf-8"))
        lines = merges_txt.read_text(encoding="utf-8").strip().split("\n")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read tokenizer files {vocab_json} / {merges_txt}: {exc}") from exc
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    # transformers' CLIPTokenizer reads at most this many merges, whatever the file holds.
    merges = [tuple(line.split()) for line in lines[:_N_MERGES] if line.strip()]
    missing = [s for s in _HF_SPECIALS if s not in encoder]
    if missing or any(len(m) != 2 for m in merges):
        raise UserError(f"{vocab_json.parent} is not a CLIP tokenizer (missing {missing or 'well-formed merges'})")
    return _Vocabulary({str(k): int(v) for k, v in encoder.items()}, merges, str(vocab_json.parent))  # type: ignore[arg-type]


@lru_cache(maxsize=8)
def _load_vocabulary(path: str) -> _Vocabulary:
    p = Path(path)
    if p.is_dir():
        for folder in (p, p / "tokenizer"):
            if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                return _read_hf_folder(folder / "vocab.json", folder / "merges.txt")
            if (folder / BPE_FILE_NAME).is_file():
                return _read_clip_bpe(folder / BPE_FILE_NAME)
        raise UserError(f"no CLIP vocabulary in {p} (expected vocab.json + merges.txt, or {BPE_FILE_NAME})")
    if p.name == "vocab.json":
        return _read_hf_folder(p, p.with_name("merges.txt"))
    if p.is_file():
        return _read_clip_bpe(p)
    raise UserError(f"CLIP tokenizer vocabulary not found: {p}")


def _resolve_vocabulary(vocab: str | Path | None) -> _Vocabulary:
    if vocab is None:
        found = find_bpe_vocab()
        if found is None:
            raise UserError(
                f"no CLIP tokenizer vocabulary: install open-clip-torch (it ships {BPE_FILE_NAME}) "
                "or give the model's tokenizer folder (vocab.json + merges.txt)")
        vocab = found
    return _load_vocabulary(str(Path(vocab).expanduser().resolve()))


class ClipTokenizer:
    """CLIP BPE tokenizer with A1111's ids; `encode` returns ids without start/end tokens.

    Args:
        pad_id: id written after the end token of a short chunk. None = the end id (SD1, SDXL encoder 1);
            0 for SD2 and SDXL encoder 2.
        vocab: BPE `.txt.gz`, a `vocab.json`, or a folder holding `vocab.json` + `merges.txt` (or a `tokenizer/`
            subfolder with them). None = the file bundled with open-clip-torch.
        flavor: "open_clip" (SimpleTokenizer: ftfy, HTML-unescape twice; literal `<end_of_text>` is the end
            token) or "hf" (transformers' slow CLIPTokenizer: ftfy only; literal `<|endoftext|>`).
    Source: open_clip v2.20.0 `tokenizer.SimpleTokenizer.encode`; transformers `CLIPTokenizer._tokenize`.
    """

    def __init__(self, pad_id: int | None = None, vocab: str | Path | None = None, flavor: Flavor = "open_clip"):
        if flavor not in FLAVORS:
            raise UserError(f"unknown tokenizer flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
        self._vocab = _resolve_vocabulary(vocab)
        self.flavor = flavor
        enc = self._vocab.encoder
        self.start_id: int = enc[_HF_SPECIALS[0]]
        self.end_id: int = enc[_HF_SPECIALS[1]]
        self.pad_id: int = self.end_id if pad_id is None else int(pad_id)
        self.vocab_size: int = max(enc.values()) + 1
        if not 0 <= self.pad_id < self.vocab_size:
            raise UserError(f"pad id {self.pad_id} is outside the vocabulary (size {self.vocab_size})")
        self.comma_id: int | None = enc.get(",</w>")
        # transformers maps an unknown symbol to its unk token, <|endoftext|>; open_clip's vocabulary has none.
        self.unk_id = self.end_id
        start_text, end_text = _SPECIALS[flavor]
        self._special_ids = {start_text: self.start_id, end_text: self.end_id}
        # CLIP's pre-tokeniser: the literal specials, English contractions, letter runs, single digits, and runs
        # of other non-space characters. Imported here: `regex` (for \p{..}) is only needed once text is encoded.
        import regex
        specials = "|".join(regex.escape(s) for s in (start_text, end_text))
        self._pattern = regex.compile(
            specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
        self._whitespace = regex.compile(r"\s+")
        self._split_specials = regex.compile("(" + specials + ")")
        self._cache: dict[str, list[int]] = {}

    @property
    def source(self) -> str:
        """Where the vocabulary was read from."""
        return self._vocab.source

    def clean(self, text: str) -> str:
        """Text clean-up before pre-tokenisation: ftfy, (open_clip: HTML-unescape ×2), whitespace, lower case."""
        import ftfy
        text = ftfy.fix_text(text)
        if self.flavor == "open_clip":
            text = html.unescape(html.unescape(text))
        return self._whitespace.sub(" ", text).strip().lower()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise UserError(f"a prompt must be text, not {type(text).__name__}")
        if self.flavor == "hf":
            # transformers cuts the raw text at literal special tokens before anything else (its added-tokens
            # trie, case-sensitive), so "x><|endoftext|>" gives ">" + end, where one regex pass would take "><|".
            parts = self._split_specials.split(text)
        else:
            parts = [text]
        ids: list[int] = []
        for part in parts:
            if part in self._special_ids:
                ids.append(self._special_ids[part])
                continue
            for piece in self._pattern.findall(self.clean(part)):
                cached = self._cache.get(piece)
                if cached is None:
                    cached = self._encode_piece(piece)
                    if len(self._cache) >= _CACHE_LIMIT:
                        self._cache.clear()
                    self._cache[piece] = cached
                ids.extend(cached)
        return ids

    def _encode_piece(self, piece: str) -> list[int]:
        special = self._special_ids.get(piece)
        if special is not None:
            return [special]
        symbols = "".join(_BYTE_TO_SYMBOL[b] for b in piece.encode("utf-8"))
        enc = self._vocab.encoder
        return [enc.get(s, self.unk_id) for s in self._bpe(symbols)]

    def _bpe(self, word: str) -> list[str]:
        """Apply the merges to one pre-token: repeatedly join the adjacent pair with the lowest merge rank
        (every non-overlapping occurrence, left to right) until no pair has a rank. The last symbol carries the
        end-of-word marker "</w>"."""
        parts = [*word[:-1], word[-1] + "</w>"]
        ranks = self._vocab.ranks
        while len(parts) > 1:
            ranked = [(ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in ranks]
            if not ranked:
                break
            _, best = min(ranked)
            first, second = parts[best], parts[best + 1]
            joined: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    joined.append(first + second)
                    i += 2
                else:
                    joined.append(parts[i])
                    i += 1
            parts = joined
        return parts

    def decode(self, ids: list[int]) -> str:
        """Readable text for ids (word ends become spaces); for messages and debugging, not a round trip."""
        dec = self._vocab.decoder
        text = "".join(dec.get(int(i), "") for i in ids).replace("</w>", " ")
        # every vocabulary character is a byte stand-in; only the spaces inserted above are not
        data = bytes(_SYMBOL_TO_BYTE.get(ch, 0x20) for ch in text)
        return data.decode("utf-8", errors="replace").strip()

    def token_id(self, token: str) -> int | None:
        """Id of a vocabulary entry such as ",</w>" (None if absent)."""
        return self._vocab.encoder.get(token)


def make_tokenizers(family: str, vocab: str | Path | None = None) -> list[ClipTokenizer]:
    """The tokenizer(s) A1111 uses for a model family, one per text encoder.

    sd1: [hf, pad = end]; sd2: [open_clip, pad 0]; sdxl: [hf, pad = end] + [open_clip, pad 0]
    (A1111 v1.10.1 `sd_hijack.StableDiffusionModelHijack.hijack` picks the wrappers).
    """
    if family == "sd1":
        return [ClipTokenizer(None, vocab, "hf")]
    if family == "sd2":
        return [ClipTokenizer(0, vocab, "open_clip")]
    if family == "sdxl":
        return [ClipTokenizer(None, vocab, "hf"), ClipTokenizer(0, vocab, "open_clip")]
    raise UserError(f"unknown model family {family!r}; choose one of sd1, sd2, sdxl")
