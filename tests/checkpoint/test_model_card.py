"""The model card and its results (winaconv/checkpoint/model_card.py)."""

import json

import pytest
from huggingface_hub import ModelCard

from winaconv.checkpoint.model_card import RESULTS_FILE, build_model_card, write_model_card
from winaconv_runtime.architectures import PROJECTIONS


def test_model_card_metadata_and_content(ckpt):
    (ckpt / RESULTS_FILE).write_text(json.dumps({
        "perplexity": {"0": 30.5, "0.25": 31.0, "0.5": 33.25},
        "perplexity_note": "held-out text, window 512",
        "speed": {"0": 10.0, "0.5": 5.0},
        "speed_note": "H100, bf16, batch 1",
    }))
    path, written = write_model_card(ckpt, "someone/tiny-wina")
    assert written and path == ckpt / "README.md"

    for card in (ModelCard.load(path), ModelCard(path.read_text())):
        data = card.data
        assert data.base_model == "example-org/tiny-llama"
        assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
        assert {"winaconv", "wina", "activation-sparsity", "transform-global", "llama"} <= set(data.tags)
    text = path.read_text()
    config = json.loads((ckpt / "config.json").read_text())
    rows = config["winaconv"]["levels"]["0.5"]["sparsities"]
    means = [sum(r[i] for r in rows) / len(rows) for i in range(len(PROJECTIONS))]
    assert "| 0.5 (default) | " + " | ".join(f"{m:.3f}" for m in means) in text
    assert "| 0.25 | " in text and "`global`" in text and "WINA" in text
    assert config["winaconv"]["calibration"]["source"] in text
    assert "| 0.5 | 33.250 | 5.00 | 2.00x |" in text and "| 0.25 | 31.000 |  |  |" in text
    assert "held-out text, window 512" in text and "H100, bf16, batch 1" in text
    assert 'from_pretrained("someone/tiny-wina", trust_remote_code=True, sparsity=0.5)' in text
    assert "model.set_sparsity(0.25)" in text


def test_model_card_variants(ckpt):
    """No results file: no results section; a base model recorded as a local path is not put in the metadata;
    `winaconv eval --json` output is accepted as a results file; a user's own README.md is kept."""
    card = build_model_card(ckpt, "a/b")
    assert "Measured results" not in str(card)

    config = json.loads((ckpt / "config.json").read_text())
    config["winaconv"]["base_model"]["id"] = "/home/me/models/tiny"
    (ckpt / "config.json").write_text(json.dumps(config))
    card = build_model_card(ckpt, "a/b")
    assert card.data.base_model is None and "`/home/me/models/tiny`" in str(card)
    assert build_model_card(ckpt, "a/b", base_model="org/base").data.base_model == "org/base"

    (ckpt / RESULTS_FILE).write_text(json.dumps({"text": "news", "window": 256, "stride": 256, "results": [
        {"sparsity": 0.0, "perplexity": 12.5}, {"sparsity": 0.5, "perplexity": 13.75}]}))
    text = str(build_model_card(ckpt, "a/b"))
    assert "| 0.5 | 13.750 |" in text and "news, window 256" in text

    (ckpt / RESULTS_FILE).write_text(json.dumps({"perplexity": {"0.5": "high"}}))
    with pytest.raises(Exception, match="not a finite number"):
        build_model_card(ckpt, "a/b")
    (ckpt / RESULTS_FILE).unlink()

    (ckpt / "README.md").write_text("# my own notes\n")
    assert write_model_card(ckpt, "a/b") == (ckpt / "README.md", False)
    assert (ckpt / "README.md").read_text() == "# my own notes\n"
