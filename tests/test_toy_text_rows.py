"""The shipped toy model's token rows: the concept tokens are rare tokens as in a real CLIP (issue #13).

bench/README.md ("Why the LoRA does not bind") rests on these measured facts of the bundled
`toy-sd1.safetensors`: the rows of the words the toy world says were trained, every other row (the sub-words of
`zwx` and `zkz` among them) kept its initial value, and the untouched rows are not quieter than the trained ones.
If the model file changes, these checks say whether that diagnosis still holds.
"""

from __future__ import annotations

import pytest
import torch

from lib_sdtrain.toy import world

KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


@pytest.fixture(scope="module")
def rows():
    from safetensors import safe_open

    from lib_sdtrain.hosts import default_model
    from lib_sdtrain.models.tokenizer import make_tokenizers

    with safe_open(str(default_model()), "pt") as f:
        table = f.get_tensor(KEY).float()
    tok = make_tokenizers("sd1")[0]
    captions = [s.caption() for s in world.sample_scenes(600, 1, holdout="exclude")]
    captions += [s.caption(generic=True) for s in world.sample_scenes(200, 2, holdout="exclude")]
    world_ids = sorted({i for c in captions for i in tok.encode(c)})
    return table, tok, world_ids


def test_concept_tokens_are_untrained_sub_words(rows):
    _table, tok, world_ids = rows
    z, wx = tok.encode(world.SUBJECT_TOKEN)
    z2, kz = tok.encode(world.STYLE_TOKEN)
    assert z == z2                      # "zwx" and "zkz" share the row of "z"
    assert not {z, wx, kz} & set(world_ids)
    assert 20 <= len(world_ids) <= 40   # the toy world's own vocabulary (27 ids today)


def test_untouched_rows_are_as_loud_as_the_trained_ones(rows):
    table, tok, world_ids = rows
    norms = table.norm(dim=1)
    mask = torch.ones(len(norms), dtype=torch.bool)
    mask[world_ids] = False
    trained, other = norms[world_ids], norms[mask]
    # measured 0.232 ± 0.018 (trained) vs 0.226 ± 0.014 (the other 49,381 rows)
    assert abs(float(other.mean()) / float(trained.mean()) - 1) < 0.1
    lo, hi = float(trained.min()), float(trained.max())
    for token in (world.SUBJECT_TOKEN, world.STYLE_TOKEN):
        for i in tok.encode(token):
            assert 0.8 * lo <= float(norms[i]) <= 1.2 * hi, (token, i, float(norms[i]))
