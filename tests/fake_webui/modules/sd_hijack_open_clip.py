"""modules.sd_hijack_open_clip: OpenCLIP text wrappers (SD2; SDXL's second encoder with the pooled output).

As A1111 v1.10.1, the tokenizer is open_clip's module-level `SimpleTokenizer` (`open_clip.tokenizer._tokenizer`),
not an attribute of the wrapped embedder. Here it is the installed open_clip's own `tokenizer.py`, loaded by
file (importing the `open_clip` package pulls in torchvision, which does not import beside a CPU-only torch).
"""

import importlib.util

import torch

from modules import devices, sd_hijack_clip


def _open_clip_tokenizer():
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        file_spec = importlib.util.spec_from_file_location("_fake_webui_open_clip_tokenizer",
                                                           f"{folder}/tokenizer.py")
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        return module._tokenizer
    raise ImportError("the fake WebUI needs open-clip-torch installed (its SimpleTokenizer)")


tokenizer = _open_clip_tokenizer()


class _OpenClipWords(sd_hijack_clip.TextConditionalModel):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.comma_token = [v for k, v in tokenizer.encoder.items() if k == ",</w>"][0]
        self.id_start = tokenizer.encoder["<start_of_text>"]
        self.id_end = tokenizer.encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts):
        return [tokenizer.encode(text) for text in texts]

    def encode_embedding_init_text(self, init_text, nvpt):
        ids = tokenizer.encode(init_text)
        ids = torch.asarray([ids], device=devices.device, dtype=torch.int)
        return self.wrapped.model.token_embedding.wrapped(
            ids.to(self.wrapped.model.token_embedding.wrapped.weight.device)).squeeze(0)


class FrozenOpenCLIPEmbedderWithCustomWords(_OpenClipWords):
    def encode_with_transformers(self, tokens):
        return self.wrapped.encode_with_transformer(tokens)


class FrozenOpenCLIPEmbedder2WithCustomWords(_OpenClipWords):
    def encode_with_transformers(self, tokens):
        d = self.wrapped.encode_with_transformer(tokens)
        z = d[self.wrapped.layer]
        pooled = d.get("pooled")
        if pooled is not None:
            z.pooled = pooled
        return z
