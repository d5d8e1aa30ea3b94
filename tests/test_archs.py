"""The architecture table (slmkit/archs.py): the generated support matrix, the depth rule of
pattern families, and that nothing outside the table branches on the model type."""

import re
from pathlib import Path

import pytest

from slmkit import archs

ROOT = Path(__file__).resolve().parents[1]


def test_docs_architectures_is_generated_from_the_table():
    doc = ROOT / "docs" / "architectures.md"
    assert doc.read_text() == archs.matrix(), "stale: run `python -m slmkit.archs docs/architectures.md`"
    assert archs.main(["--check", str(doc)]) == 0


def test_stale_docs_are_caught(tmp_path):
    doc = tmp_path / "architectures.md"
    assert archs.main([str(doc)]) == 0 and archs.main(["--check", str(doc)]) == 0
    doc.write_text(doc.read_text().replace("| yes", "| no", 1))
    assert archs.main(["--check", str(doc)]) == 1


def test_every_family_has_a_tiny_model_of_its_real_config_class():
    import transformers

    from conftest import ARCHS, TINY

    assert set(TINY) == set(archs.TABLE)
    assert set(ARCHS) == set(archs.PRUNABLE) | set(archs.EXPORTABLE)
    for a in archs.TABLE.values():
        assert getattr(transformers, a.config_class)().model_type == a.model_type
        # prune.apply_plan keeps a scaled embedding by scaling the branch output norms
        assert not (a.prune and a.embed_scale) or a.output_norms, a.model_type


def test_no_model_type_branches_outside_the_table():
    for name in ("prune.py", "export.py"):
        src = (ROOT / "src" / "slmkit" / name).read_text()
        code = "\n".join(line.split("#")[0] for line in src.splitlines())
        assert not re.search(r"model_type\s*[!=]=|model_type\s+(not\s+)?in\s", code), name
        assert not re.search(r"\barch\s*[!=]=\s*\"", code), name


GEMMA3 = archs.TABLE["gemma3_text"]


def test_keep_layers_follows_the_pattern_and_maximises_the_score():
    types = archs.layer_types(GEMMA3, 18)  # 5 sliding, 1 global, x3 (Gemma-3-270M)
    assert types[5] == types[11] == types[17] == "full_attention" and types.count("full_attention") == 3
    scores = [float(i % 7) for i in range(18)]
    for n in range(1, 18):
        kept = archs.keep_layers(GEMMA3, scores, types, n)
        assert len(kept) == n and kept == sorted(kept)
        assert [types[i] for i in kept] == archs.layer_types(GEMMA3, n)
    # brute force on a smaller case: no valid subsequence scores more
    import itertools

    types, scores = archs.layer_types(GEMMA3, 9), [3, 1, 4, 1, 5, 9, 2, 6, 5]
    for n in range(1, 9):
        best = max(sum(scores[i] for i in c) for c in itertools.combinations(range(9), n)
                   if [types[i] for i in c] == archs.layer_types(GEMMA3, n))
        assert sum(scores[i] for i in archs.keep_layers(GEMMA3, scores, types, n)) == best


def test_keep_layers_refuses_what_the_pattern_cannot_express():
    from slmkit.errors import UsageError

    types = ["sliding_attention"] * 5 + ["full_attention"]
    with pytest.raises(UsageError, match="pattern"):
        archs.keep_layers(GEMMA3, [1.0] * 6, ["full_attention"] + types[:5], 6)
    # a family without a pattern keeps the best layers
    assert archs.keep_layers(archs.TABLE["llama"], [0.1, 0.9, 0.5, 0.7], [], 2) == [1, 3]


def test_scale_norm_scales_the_effective_weight():
    import torch

    w = torch.tensor([0.5, -0.2])
    archs.scale_norm(GEMMA3, w, 2.0)  # (1 + w) doubles
    assert torch.allclose(1 + w, torch.tensor([3.0, 1.6]))
    w = torch.tensor([0.5, -0.2])
    archs.scale_norm(archs.TABLE["llama"], w, 2.0)
    assert torch.allclose(w, torch.tensor([1.0, -0.4]))


@pytest.mark.parametrize("arch", [a for a, r in archs.TABLE.items() if r.logit_post and not r.prune])
def test_head_outside_the_model_applies_its_logit_processing(arch, tmp_path):
    """Gemma 2's final_logit_softcapping and Cohere's logit_scale: the head distill and scoring
    apply to final hidden states (distill.final_hidden, scoring._head) gives the model's logits;
    lm_head alone would not (the gap distillation trained on)."""
    import torch

    from conftest import make_tiny_model
    from slmkit import models, scoring
    from slmkit.distill import final_hidden

    model, _ = models.load_model(make_tiny_model(arch, tmp_path / arch, layers=2))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        logits = model(ids).logits
        with final_hidden(model) as head:
            hidden = model(ids).logits
            assert (head(hidden) - logits).abs().max() < 1e-5
        raw = model.get_output_embeddings()(hidden)
        assert (raw - logits).abs().max() > 0.5
        assert (scoring._head(model)(hidden) - logits).abs().max() < 1e-5


def test_unknown_logit_processing_is_refused_before_weights_load(tmp_path, monkeypatch):
    """Granite divides its logits by `logits_scaling`, a family the table does not know: distill
    refuses the pair from config.json; scoring runs the whole model instead."""
    import transformers as tf

    from conftest import make_tokenizer
    from slmkit import models
    from slmkit.errors import UsageError

    tok = make_tokenizer()
    cfg = tf.GraniteConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4, logits_scaling=4.0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "g")
    tok.save_pretrained(tmp_path / "g")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(UsageError, match="logits_scaling"):
        models.shared_vocab(tmp_path / "g", tmp_path / "g")
    assert archs.logit_post({"model_type": "llama"}) is None


@pytest.mark.parametrize("arch", list(archs.TABLE))
def test_every_family_distils_and_evaluates(arch, tmp_path, cli):
    """The matrix's distill / eval column: a 1-layer student of the family learns from a 2-layer
    teacher of the same family (logit KD through the head outside the model), and `slm eval`
    scores the student's perplexity."""
    import json

    from conftest import CORPUS, make_tiny_model

    teacher = make_tiny_model(arch, tmp_path / "t", layers=2, seed=0)
    student = make_tiny_model(arch, tmp_path / "s", layers=1, seed=1)
    data, text = tmp_path / "data.jsonl", tmp_path / "text.txt"
    data.write_text("".join(json.dumps({"input": CORPUS[i % 10], "output": CORPUS[(i + 3) % 10]})
                            + "\n" for i in range(12)))
    text.write_text("\n".join(CORPUS))
    code, _, err = cli("distill", "--student", student, "--teacher", teacher, "--data", data,
                       "--out", tmp_path / "out", "--max-steps", 2, "--batch-size", 4,
                       "--device", "cpu")
    assert code == 0, err
    losses = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(v == v for row in losses for v in row.values() if isinstance(v, float))
    code, _, err = cli("eval", tmp_path / "out", "--ppl", text, "--out", tmp_path / "report")
    assert code == 0, err
