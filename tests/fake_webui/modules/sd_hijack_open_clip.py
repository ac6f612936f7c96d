"""Stand-in for `modules.sd_hijack_open_clip`: the OpenCLIP wrappers (SD2's encoder, SDXL's bigG with pooling).

As in A1111 v1.10.1 the tokenizer is open_clip's module-level SimpleTokenizer, exposed here as the module
attribute `tokenizer` (not on the wrapped embedder). It is loaded from the installed open_clip's
`tokenizer.py` by file: importing the whole package would pull in torchvision, which a CPU-only torch lacks.
Special ids: start/end of text from its vocabulary, padding 0.
"""

import importlib.util

import torch

from modules import devices, sd_hijack_clip


def _load_simple_tokenizer():
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders:
        raise ImportError("the fake WebUI needs open-clip-torch installed (its SimpleTokenizer)")
    file_spec = importlib.util.spec_from_file_location("_fake_webui_open_clip_tokenizer", f"{folders[0]}/tokenizer.py")
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module._tokenizer


tokenizer = _load_simple_tokenizer()


class _OpenClipWrapper(sd_hijack_clip.TextConditionalModel):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        vocab = tokenizer.encoder
        self.comma_token = vocab[",</w>"]
        self.id_start, self.id_end, self.id_pad = vocab["<start_of_text>"], vocab["<end_of_text>"], 0

    def tokenize(self, texts):
        return [tokenizer.encode(t) for t in texts]

    def encode_embedding_init_text(self, init_text, nvpt):
        table = self.wrapped.model.token_embedding.wrapped
        ids = torch.tensor([tokenizer.encode(init_text)], dtype=torch.int, device=table.weight.device)
        return table(ids).squeeze(0)


class FrozenOpenCLIPEmbedderWithCustomWords(_OpenClipWrapper):
    def encode_with_transformers(self, tokens):
        return self.wrapped.encode_with_transformer(tokens)


class FrozenOpenCLIPEmbedder2WithCustomWords(_OpenClipWrapper):
    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.encode_with_transformer(tokens)
        hidden = outputs[self.wrapped.layer]
        if outputs.get("pooled") is not None:
            hidden.pooled = outputs["pooled"]
        return hidden
