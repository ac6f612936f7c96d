"""modules.textual_inversion.textual_inversion: the embedding database (names = file stems)."""

import os


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec, self.name, self.step = vec, name, step
        self.filename = None


class EmbeddingDatabase:
    def __init__(self):
        self.word_embeddings = {}
        self.skipped_embeddings = {}
        self.embedding_dirs = {}
        self.loads = 0                  # fake only: how many forced reloads happened

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = path

    def clear_embedding_dirs(self):
        self.embedding_dirs.clear()

    def load_textual_inversion_embeddings(self, force_reload=False):
        if force_reload:
            self.loads += 1
        self.word_embeddings.clear()
        for path in self.embedding_dirs:
            if not path or not os.path.isdir(path):
                continue
            for root, _, files in os.walk(path):
                for fn in sorted(files):
                    stem, ext = os.path.splitext(fn)
                    if ext.lower() in (".pt", ".bin", ".safetensors", ".png", ".webp"):
                        emb = Embedding(None, stem)
                        emb.filename = os.path.join(root, fn)
                        self.word_embeddings[stem] = emb

    def find_embedding_at_position(self, tokens, offset):
        return None, None
