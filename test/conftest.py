"""Fixtures of the plugin's tests (the shared set-up is the root conftest's)."""

from __future__ import annotations

import json

import pytest

from sglang_hip_decode import gates, patching

from patch_fixtures import RMSNORM, STAND_IN_PATCHES, install_test_catalog


@pytest.fixture
def stand_in(monkeypatch):
    """The stand-in catalog of test-only patches, no switch set; every one unapplied afterwards."""
    install_test_catalog(monkeypatch.setattr)
    for var in (gates.ENV_ENABLE, gates.ENV_PATCHES, gates.ENV_ANY_PLATFORM, gates.ENV_STATUS_FILE):
        monkeypatch.delenv(var, raising=False)
    original = patching.resolve_target(RMSNORM)[2]
    yield
    for patch in reversed(STAND_IN_PATCHES):
        patching.unapply(patch)
    assert patching.resolve_target(RMSNORM)[2] is original


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The runner's data files and a model folder holding a word-level tokenizer."""
    root = tmp_path_factory.mktemp("ab")
    gsm = root / "gsm8k.jsonl"
    with open(gsm, "w") as fh:
        for a, b in [(3, 4), (10, 5), (7, 8), (12, 30), (1, 1), (25, 17)]:
            fh.write(json.dumps({"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")
    share = root / "sharegpt.json"
    convs = [{"conversations": [{"from": "human", "value": f"tell me about w{i} and w{i + 1} please"},
                                {"from": "gpt", "value": f"w{i} is a word"}]} for i in range(20)]
    share.write_text(json.dumps(convs))
    # A tiny word-level tokenizer, saved the way a model folder holds one (bench_serving loads it).
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["tell", "me", "about", "and", "please", "is", "a", "word"] + [f"w{i}" for i in range(64)]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = root / "model"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)
    return {"gsm": gsm, "share": share, "model": model_dir, "root": root}
