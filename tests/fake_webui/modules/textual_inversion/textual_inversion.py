"""Stand-in for `modules.textual_inversion.textual_inversion`: the `Embedding` record and the word database.

Behaviour kept from A1111 v1.10.1 (a1111-host.md §4; names are the ones the host and the tests use):
* A word is the file stem. `word_embeddings` maps word → Embedding (re-sorted case-insensitively after every
  reload); `ids_lookup` maps the first token id of a word → list of (token ids, Embedding), longest ids first,
  which the prompt chunker scans (`find_embedding_at_position`). `skipped_embeddings` holds files whose width
  does not fit the loaded model (`expected_shape`).
* Registering a word drops entries of the same word from its id list, adds the new one and stores a freshly
  sorted list; when the word was not known yet the new entry is first appended to the existing list object
  (upstream does that too; the host's restore code relies on knowing it). Registering `None` removes the word.
* A reload (forced, or when a folder's mtime moved) empties everything and reads the folders again; files are
  read by the rules in tests/a1111_ti_hn.py (A1111's restricted .pt reader and its three accepted layouts).

Test-only leniency: an unreadable .pt/.bin/.safetensors still appears in `word_embeddings` by name (vec None,
never matched), so folder scans can use placeholder files; A1111 would log and skip it. Image embeddings are
not read. `loads` counts forced reloads.
"""

import hashlib
import os
import sys

import torch

from modules import devices, shared


def _file_rules():
    tests_dir = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 3))
    if tests_dir not in sys.path:
        sys.path.append(tests_dir)
    import a1111_ti_hn

    return a1111_ti_hn


class Embedding:
    """One textual-inversion word: `vec` is a [n, width] tensor, or {clip_l, clip_g} for SDXL."""

    def __init__(self, vec, name, step=None):
        self.vec, self.name, self.step = vec, name, step
        self.shape = None                # width the vectors have (768, 1024, 2048 for SDXL's pair)
        self.vectors = 0                 # how many token positions the word takes
        self.filename = None
        self.sd_checkpoint = self.sd_checkpoint_name = None
        self.optimizer_state_dict = None
        self.hash = self.shorthash = None
        self.cached_checksum = None

    def set_hash(self, value):
        self.hash, self.shorthash = value, value[:12]

    def checksum(self):
        """A short stable tag of the values (only used for display)."""
        if self.cached_checksum is None:
            flat = torch.cat([t.reshape(-1) for t in (self.vec.values() if isinstance(self.vec, dict)
                                                      else [self.vec])]).float()
            acc = 0
            for x in (flat * 100).tolist():
                acc = ((acc * 281) ^ (int(x) * 997)) & 0xFFFFFFFF
            self.cached_checksum = format(acc & 0xFFFF, "04x")
        return self.cached_checksum


class DirWithTextualInversionEmbeddings:
    """A folder of embeddings and the modification time seen at its last scan."""

    def __init__(self, path):
        self.path, self.mtime = path, None

    def _now(self):
        return os.path.getmtime(self.path) if os.path.isdir(self.path) else None

    def has_changed(self):
        now = self._now()
        return now is not None and (self.mtime is None or now > self.mtime)

    def update(self):
        now = self._now()
        if now is not None:
            self.mtime = now


def _as_embedding(data, name, filename="unknown embedding file", filepath=None):
    """Embedding from a loaded file's contents, in the three layouts A1111 accepts (else an error)."""

    def on_device(t):
        return t.detach().to(devices.device, dtype=torch.float32)

    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if len(params) != 1:
            raise ValueError(f"{filename}: more than one word in one embedding file")
        vec = on_device(next(iter(params.values())))
        width, count = vec.shape[-1], vec.shape[0]
    elif isinstance(data, dict) and "clip_l" in data and "clip_g" in data:
        vec = {k: on_device(v) for k, v in data.items()}
        width, count = data["clip_l"].shape[-1] + data["clip_g"].shape[-1], data["clip_g"].shape[0]
    elif isinstance(data, dict) and data and all(torch.is_tensor(v) for v in data.values()):
        if len(data) != 1:
            raise ValueError(f"{filename}: more than one word in one embedding file")
        only = next(iter(data.values()))
        vec = on_device(only if only.dim() > 1 else only[None])
        width, count = vec.shape[-1], vec.shape[0]
    else:
        raise ValueError(f"{filename} is not a textual-inversion embedding A1111 can read")
    emb = Embedding(vec, name, step=data.get("step"))
    emb.sd_checkpoint, emb.sd_checkpoint_name = data.get("sd_checkpoint"), data.get("sd_checkpoint_name")
    emb.shape, emb.vectors = width, count
    if filepath:
        emb.filename = filepath
        with open(filepath, "rb") as fh:
            emb.set_hash(hashlib.sha256(fh.read()).hexdigest())
    return emb


create_embedding_from_data = _as_embedding       # the upstream name, for callers that use it


class EmbeddingDatabase:
    def __init__(self):
        self.word_embeddings, self.ids_lookup, self.skipped_embeddings = {}, {}, {}
        self.embedding_dirs = {}              # folder → DirWithTextualInversionEmbeddings
        self.expected_shape = -1              # -1: no model loaded yet, every width accepted
        self.loads = 0

    # ---- folders ----------------------------------------------------------------------------------------
    def clear_embedding_dirs(self):
        self.embedding_dirs.clear()

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = DirWithTextualInversionEmbeddings(path)

    # ---- words --------------------------------------------------------------------------------------------
    def register_embedding(self, embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding, model, name):
        """Put `embedding` under `name` (None: take the word out); its ids come from the model's tokenizer."""
        ids = model.cond_stage_model.tokenize([name])[0]
        head = ids[0]
        existing = self.ids_lookup.setdefault(head, [])
        if name in self.word_embeddings:
            entries = [pair for pair in existing if pair[1].name != name]
        else:
            entries = existing                           # appended to in place, like upstream
        if embedding is not None:
            entries += [(ids, embedding)]
        self.ids_lookup[head] = sorted(entries, key=lambda pair: len(pair[0]), reverse=True)
        if embedding is not None:
            self.word_embeddings[name] = embedding
            return embedding
        self.word_embeddings.pop(name, None)
        if not self.ids_lookup[head]:
            del self.ids_lookup[head]
        return None

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], ()):
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None

    # ---- reading the folders ------------------------------------------------------------------------------
    def get_expected_shape(self):
        probe = shared.sd_model.cond_stage_model.encode_embedding_init_text(",", 1)
        return probe.shape[1]

    def _read(self, path):
        ext = os.path.splitext(path)[1].lower()
        if ext in (".pt", ".bin"):
            return _file_rules().a1111_load(path)
        if ext == ".safetensors":
            import safetensors.torch

            return safetensors.torch.load_file(path, device="cpu")
        return None

    def _add_file(self, path):
        name = os.path.splitext(os.path.basename(path))[0]
        try:
            data = self._read(path)
            if data is None:
                return
            emb = _as_embedding(data, name, filename=os.path.basename(path), filepath=path)
        except Exception:  # noqa: BLE001 - see the module docstring (placeholder files)
            if os.path.splitext(path)[1].lower() in (".pt", ".bin", ".safetensors"):
                stub = Embedding(None, name)
                stub.filename = path
                self.word_embeddings[name] = stub
            return
        if self.expected_shape in (-1, emb.shape):
            self.register_embedding(emb, shared.sd_model)
        else:
            self.skipped_embeddings[name] = emb

    def load_textual_inversion_embeddings(self, force_reload=False):
        if force_reload:
            self.loads += 1
        elif not any(d.has_changed() for d in self.embedding_dirs.values()):
            return
        for table in (self.ids_lookup, self.word_embeddings, self.skipped_embeddings):
            table.clear()
        self.expected_shape = -1 if shared.sd_model is None else self.get_expected_shape()
        for folder in self.embedding_dirs.values():
            if os.path.isdir(folder.path):
                for root, _, names in os.walk(folder.path, followlinks=True):
                    for fn in sorted(names):
                        full = os.path.join(root, fn)
                        if os.stat(full).st_size:
                            self._add_file(full)
            folder.update()
        ordered = sorted(self.word_embeddings.items(), key=lambda kv: kv[0].lower())
        self.word_embeddings.clear()
        self.word_embeddings.update(ordered)
