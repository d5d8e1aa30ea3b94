"""slm prune on the tiny fixtures (4 layers, hidden 32, ffn 64, 4 heads of 8, 2 KV groups; Phi has
4 KV heads). The pruned model must compute exactly what the original computes with the removed
parts masked to zero."""

import copy
import json
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from slmkit import archs, models
from slmkit import prune as P


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: two threads spin against each other (~100x slower
    under load); one thread is plenty."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_keep(model, dst: P.Shape, seed=0) -> dict:
    """What to keep, chosen by random importance scores (so no calibration is needed)."""
    cfg = model.config
    src = P.source_shape(cfg.to_dict())
    g = torch.Generator().manual_seed(seed)
    L, D = src.layers, src.hidden
    scores = {"block_influence": torch.rand(L, generator=g), "heads": torch.rand(L, src.heads, generator=g),
              "ffn": torch.rand(L, src.ffn, generator=g), "hidden": torch.rand(L, D, generator=g),
              "final_hidden": torch.rand(D, generator=g)}
    return P.select(scores, src, dst, archs.TABLE[cfg.model_type], getattr(cfg, "layer_types", None))


def masked_reference(model, keep: dict):
    """The original model with removed layers, heads and MLP channels masked to zero: a removed
    layer writes nothing to the residual stream (o_proj/down_proj and their biases zeroed, so the
    block is the identity); a removed head's and channel's outputs are zeroed where they enter
    o_proj / down_proj."""
    ref = copy.deepcopy(model)
    _, parts, _ = P._modules(ref)
    H, F_ = ref.config.num_attention_heads, ref.config.intermediate_size
    hd = ref.model.layers[0].self_attn.head_dim
    with torch.no_grad():
        for i, (attn_out, down, _) in enumerate(parts):
            if i not in keep["layers"]:
                for lin in (attn_out, down):
                    lin.weight.zero_()
                    if lin.bias is not None:
                        lin.bias.zero_()
                continue
            j = keep["layers"].index(i)
            heads = torch.zeros(H)
            heads[keep["heads"][j]] = 1
            attn_out.weight.mul_(heads.repeat_interleave(hd))
            channels = torch.zeros(F_)
            channels[keep["ffn"][j]] = 1
            down.weight.mul_(channels)
    return ref


class KeptChannelNorm(torch.nn.Module):
    """Reference for hidden-channel pruning. RMSNorm/LayerNorm are not invariant to dropping
    channels (the mean of squares is over D' channels, not D), so masking alone cannot reproduce
    a hidden-pruned model. This norm normalises over the kept channels only and outputs 0 in the
    removed ones; everything else stays the original model with masked weights."""

    def __init__(self, norm, kept, plus_one=False):
        super().__init__()
        self.norm, self.kept, self.plus_one = norm, torch.tensor(kept), plus_one

    def forward(self, x):
        xs, k = x[..., self.kept], self.kept
        if isinstance(self.norm, torch.nn.LayerNorm):
            ys = F.layer_norm(xs, (len(k),), self.norm.weight[k], self.norm.bias[k], self.norm.eps)
        else:  # RMSNorm, as transformers computes it (in float32); Gemma's weighs by (1 + w)
            var = xs.float().pow(2).mean(-1, keepdim=True)
            eps = getattr(self.norm, "variance_epsilon", None) or self.norm.eps
            w = self.norm.weight[k].float() + (1.0 if self.plus_one else 0.0)
            ys = w * (xs.float() * torch.rsqrt(var + eps))
        y = torch.zeros_like(x)
        y[..., k] = ys.to(x.dtype)
        return y


def hidden_reference(model, keep: dict):
    """masked_reference() plus removed hidden channels: zeroed in the embedding and in every
    weight and bias that writes to the residual stream, with KeptChannelNorm for every norm."""
    ref = masked_reference(model, keep)
    D = ref.config.hidden_size
    gone = torch.ones(D, dtype=torch.bool)
    gone[keep["hidden"]] = False
    arch = archs.TABLE[ref.config.model_type]
    plus_one = arch.norm == "rms+1"
    _, parts, _ = P._modules(ref)
    with torch.no_grad():
        ref.get_input_embeddings().weight[:, gone] = 0
        for layer, (attn_out, down, _) in zip(ref.model.layers, parts):
            for lin in (attn_out, down):
                lin.weight[gone] = 0
                if lin.bias is not None:
                    lin.bias[gone] = 0
            for name in arch.branch_norms + arch.output_norms:
                setattr(layer, name, KeptChannelNorm(getattr(layer, name), keep["hidden"], plus_one))
        setattr(ref.model, arch.final_norm,
                KeptChannelNorm(getattr(ref.model, arch.final_norm), keep["hidden"], plus_one))
    return ref


def logits(model, seed=1):
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def small_shape(arch, hidden=32) -> P.Shape:
    heads, kv = (3, 3) if arch == "phi" else (2, 1)  # GQA: one whole KV group goes
    return P.Shape(layers=3, hidden=hidden, ffn=40, heads=heads, kv_heads=kv)


def test_pruned_equals_masked(tiny_model):
    """Layers, a KV group with its heads, and MLP channels removed == masked to zero."""
    model, _ = models.load_model(tiny_model)
    dst = small_shape(model.config.model_type)
    keep = random_keep(model, dst)
    pruned = P.apply_plan(model, keep, dst)
    ref = masked_reference(model, keep)
    diff = (logits(pruned) - logits(ref)).abs().max().item()
    assert diff < 1e-5, diff
    assert (logits(ref) - logits(model)).abs().max() > 1e-2  # the masks did change something


def test_heads_within_groups_equal_masked(tiny_llama):
    """GQA: keep both groups but one head in each (heads per group 2 -> 1)."""
    model, _ = models.load_model(tiny_llama)
    dst = P.Shape(layers=4, hidden=32, ffn=64, heads=2, kv_heads=2)
    keep = random_keep(model, dst, seed=3)
    assert keep["kv_groups"][0] == [0, 1] and len(keep["heads"][0]) == 2
    pruned = P.apply_plan(model, keep, dst)
    assert (logits(pruned) - logits(masked_reference(model, keep))).abs().max() < 1e-5


def test_hidden_pruning_equals_reference(tiny_model):
    """Everything at once, hidden channels too (hidden 24 with heads*head_dim = 16 or 24:
    head_dim stays 8, config.head_dim says so)."""
    model, _ = models.load_model(tiny_model)
    dst = small_shape(model.config.model_type, hidden=24)
    keep = random_keep(model, dst, seed=5)
    pruned = P.apply_plan(model, keep, dst)
    assert pruned.config.head_dim == 8 and pruned.config.hidden_size == 24
    ref = logits(hidden_reference(model, keep))
    diff = (logits(pruned) - ref).abs().max().item()
    assert diff < 1e-5 * max(1.0, ref.abs().max().item()), diff  # float32 rounding, relative
    # the plain mask (no norm fix) is not equivalent, which is why the reference needs it
    assert (logits(pruned) - logits(masked_reference(model, keep))).abs().max() > 1e-3


def test_importance_finds_dead_parts(tiny_llama):
    """Parts made inert (a layer that writes nothing, a KV group with zero values, an MLP channel
    with a zero up projection, a hidden channel nobody writes) score lowest and are cut first."""
    model, tok = models.load_model(tiny_llama)
    with torch.no_grad():
        layer = model.model.layers[2]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[8:16] = 0  # KV group 1 (heads 2, 3) outputs zero
            layer.mlp.up_proj.weight[5] = 0
            layer.self_attn.o_proj.weight[7] = 0
            layer.mlp.down_proj.weight[7] = 0
        model.get_input_embeddings().weight[:, 7] = 0
    ids = P.calibration_batch(tok, ["The quick brown fox jumps over the lazy dog."] * 8, 4, 8)
    scores = P.measure_importance(model, ids)
    assert scores["block_influence"][2] < 1e-6 < scores["block_influence"][[0, 1, 3]].min()
    src = P.source_shape(model.config.to_dict())
    keep = P.select(scores, src, P.Shape(layers=3, hidden=31, ffn=63, heads=2, kv_heads=1))
    assert keep["layers"] == [0, 1, 3] and 7 not in keep["hidden"]
    assert all(g == [0] for g in keep["kv_groups"]) and all(5 not in c for c in keep["ffn"])


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from conftest import CORPUS

    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("".join(json.dumps({"dialogue": t, "summary": t[:20]}) + "\n" for t in CORPUS))
    return path


def test_cli_end_to_end(tiny_model, calib_file, tmp_path, cli):
    """A budget through the CLI: the folder loads with plain transformers and its parameter count
    is the plan's."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    code, stdout, err = cli("prune", tiny_model, "--target", "0.6", "--calib", calib_file,
                            "--out", out, "--num-samples", "4", "--seq-len", "16")
    assert code == 0, err
    assert "prune plan" in stdout
    plan = json.loads((out / "prune_plan.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    n = models.count_parameters(plain)
    assert n == plan["parameters_after"] == models.describe(out)["parameters"]
    assert n <= plan["target_parameters"] < plan["parameters_before"]
    assert plan["calibration"]["sha256"] and len(plan["kept"]["layers"]) == plain.config.num_hidden_layers
    assert len(plan["importance"]["block_influence"]) == plan["shape_before"]["layers"]
    types = getattr(plain.config, "layer_types", None)
    if archs.TABLE[plain.config.model_type].layer_pattern:  # the kept layers read as the pattern
        assert types == archs.layer_types(archs.TABLE[plain.config.model_type], len(types))
    assert logits(plain).shape[-1] == plain.config.vocab_size
    assert not list(tmp_path.glob(".pruned*")), "temporary folder left behind"


def test_cli_explicit_shape(tiny_models, calib_file, tmp_path, cli):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "shaped"
    code, _, err = cli("prune", tiny_models["qwen2"], "--layers", "2", "--hidden", "24", "--ffn",
                       "48", "--heads", "2", "--calib", calib_file, "--out", out,
                       "--num-samples", "2", "--seq-len", "16")
    assert code == 0, err
    cfg = AutoModelForCausalLM.from_pretrained(out).config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim) == (2, 24, 48, 2, 2, 8)


def test_budget_depth_is_the_most_layers_that_fit(tiny_models, calib_file):
    cfg = models.read_config(tiny_models["mistral"])
    shapes = P.header_shapes(tiny_models["mistral"])
    plan = P.prune(P.PruneConfig(tiny_models["mistral"], target=0.8, method="depth", calib=calib_file,
                                 dry_run=True))
    dst = P.Shape(**plan["shape_after"])
    assert plan["parameters_after"] <= plan["target_parameters"]
    assert P.count_params(cfg, shapes, P.Shape(**{**plan["shape_after"], "layers": dst.layers + 1})) \
        > plan["target_parameters"]


def test_budget_both_removes_layers_then_width(tiny_models, calib_file):
    plan = P.prune(P.PruneConfig(tiny_models["mistral"], target=0.5, method="both", calib=calib_file,
                                 dry_run=True))
    after = plan["shape_after"]
    assert after["layers"] == 3  # a quarter of 4 layers, then width
    assert after["ffn"] < 64 and plan["parameters_after"] <= plan["target_parameters"]


def test_dry_run_writes_nothing(tiny_llama, calib_file, tmp_path, cli):
    out = tmp_path / "never"
    code, stdout, _ = cli("prune", tiny_llama, "--target", "0.5", "--calib", calib_file,
                          "--out", out, "--dry-run")
    assert code == 0 and "->" in stdout and not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--heads", "8"], "--heads 8"),
    (["--heads", "3"], "not divisible"),
    (["--kv-heads", "3"], "--kv-heads 3"),
    (["--hidden", "64"], "--hidden 64"),
    (["--hidden", "30"], "not divisible by --heads 4"),
    (["--layers", "0"], "--layers 0"),
    (["--target", "1.0"], "not smaller"),
    (["--target", "2G"], "--target 2G"),
    (["--target", "10", "--method", "depth"], "cannot be reached"),
    (["--target", "0.5", "--layers", "2"], "not both"),
    ([], "not both or neither"),
    (["--search", "3"], "--search needs --target"),
    (["--search", "1", "--target", "0.5"], "--search 1"),
    (["--search", "3", "--target", "0.5", "--method", "depth"], "--method depth with --search"),
    (["--search", "3", "--target", "0.5", "--layers", "2"], "--layers with --search"),
    (["--search", "3", "--target", "0.1"], "cannot be reached with hidden 32 and 4 heads"),
])
def test_bad_shapes_exit_2(tiny_llama, calib_file, tmp_path, cli, args, message):
    out = tmp_path / "out"
    code, _, err = cli("prune", tiny_llama, "--calib", calib_file, "--out", out, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_bad_data_and_arch_exit_2(tiny_llama, tmp_path, cli):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    code, _, err = cli("prune", tiny_llama, "--target", "0.5", "--calib", empty, "--out", tmp_path / "o")
    assert code == 2 and "no text" in err
    code, _, err = cli("prune", tiny_llama, "--target", "0.5", "--out", tmp_path / "o")
    assert code == 2 and "--calib" in err
    code, _, err = cli("prune", tiny_llama, "--target", "0.5", "--search", "2", "--out", tmp_path / "o")
    assert code == 2 and "--search needs --calib" in err

    alien = tmp_path / "alien"
    shutil.copytree(tiny_llama, alien)
    cfg = json.loads((alien / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (alien / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli("prune", alien, "--target", "0.5", "--calib", empty, "--out", tmp_path / "o")
    assert code == 2 and "does not support the gpt2 architecture" in err
    assert not (tmp_path / "o").exists()


def test_task_preset_as_calibration(tiny_models, tmp_path):
    from slmkit import data, tasks

    plan = P.prune(P.PruneConfig(tiny_models["phi3"], tmp_path / "p", shape={"layers": 2, "ffn": 32},
                                 task="summarize", num_samples=2, seq_len=16))
    assert plan["calibration"]["task"] == "summarize"
    assert plan["calibration"]["sha256"] == data.file_hash(tasks.preset_data("summarize"))
    assert plan["calibration"]["sequences"] == 2 and plan["method"] == "shape"
    assert models.describe(tmp_path / "p")["parameters"] == plan["parameters_after"]


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_norm_rescale_makes_dead_hidden_channels_free(arch, tiny_models):
    """Hidden channels that carry nothing (zero embedding column, nothing writes them) still change
    RMSNorm (D' instead of D in the mean); with norm_rescale the pruned model equals the original
    up to the norms' eps. Gemma 3 as well: (1 + w) norms, the branch output norms, and the
    sqrt(hidden) embedding scale (apply_plan's factor on the output norms)."""
    model, tok = models.load_model(tiny_models[arch])
    dead = [3, 7, 20, 30]
    with torch.no_grad():
        model.get_input_embeddings().weight[:, dead] = 0
        for attn_out, down, _ in P._modules(model)[1]:
            attn_out.weight[dead] = 0
            down.weight[dead] = 0
    ids = P.calibration_batch(tok, ["The quick brown fox jumps over the lazy dog."] * 8, 4, 8)
    scores = P.measure_importance(model, ids)
    src = P.source_shape(model.config.to_dict())
    dst = replace(src, hidden=28)
    keep = P.select(scores, src, dst, archs.TABLE[arch], getattr(model.config, "layer_types", None))
    assert not set(dead) & set(keep["hidden"])
    rescale = P.norm_rescale(scores, keep, src)
    assert rescale["final"] == pytest.approx((32 / 28) ** 0.5, rel=1e-5)
    plain = P.apply_plan(model, keep, dst)
    fixed = P.apply_plan(model, keep, dst, rescale)
    assert (logits(fixed) - logits(model)).abs().max() < 1e-4
    assert (logits(plain) - logits(model)).abs().max() > 1e-2


# --------------------------------------------------------------------------- --search

def test_search_candidates_fit_the_budget_and_differ(tiny_llama):
    """Tiny llama (49,952 parameters, 12,800 of them the tied embedding): from all 4 layers with a
    small MLP to the fewest layers with the full one, each the largest MLP (grid of 8) that fits."""
    cfg, shapes = models.read_config(tiny_llama), P.header_shapes(tiny_llama)
    src = P.source_shape(cfg)

    def count(s):
        return P.count_params(cfg, shapes, s)

    target = P.parse_target(0.6, count(src))
    assert target == 29_971
    family = P.search_candidates(src, count, target, 99)  # more than there are: all of them
    assert [(c.layers, c.ffn) for c in family] == [(4, 8), (3, 24), (2, 56), (1, 64)]
    assert [count(c) for c in family] == [28_448, 29_152, 29_856, 22_112]
    assert all((c.hidden, c.heads, c.kv_heads) == (32, 4, 2) for c in family)  # every head kept
    assert all(count(replace(c, ffn=c.ffn + 8)) > target for c in family if c.ffn < src.ffn)
    assert P.search_candidates(src, count, target, 3) == [family[0], family[2], family[3]]
    pinned = P.search_candidates(src, count, target, 3, P.explicit_shape(src, heads=2))
    assert [(c.layers, c.ffn, c.heads, c.kv_heads) for c in pinned] == [(4, 16, 2, 2), (3, 32, 2, 2),
                                                                        (2, 64, 2, 2)]


def test_search_writes_the_lowest_loss_candidate(tiny_llama, calib_file, tmp_path, cli):
    """The table is in prune_search.json and prune_plan.json; the folder holds its lowest-loss
    row, and loading it gives that loss on the held-out rows."""
    out = tmp_path / "searched"
    code, stdout, err = cli("prune", tiny_llama, "--target", "0.7", "--search", "3", "--calib",
                            calib_file, "--out", out, "--num-samples", "4", "--seq-len", "16")
    assert code == 0, err
    table = json.loads((out / "prune_search.json").read_text())
    plan = json.loads((out / "prune_plan.json").read_text())
    assert plan["search"] == table and plan["method"] == "search"
    rows = table["candidates"]
    assert [(r["shape"]["layers"], r["shape"]["ffn"], r["parameters"]) for r in rows] == [
        (4, 24, 34_592), (3, 40, 33_760), (2, 64, 31_392)]
    losses = [r["held_out_loss"] for r in rows]
    assert len(set(losses)) == 3 and table["chosen"] == losses.index(min(losses))
    best = rows[table["chosen"]]
    assert plan["shape_after"] == best["shape"] and plan["parameters_after"] == best["parameters"]
    assert "<- lowest loss" in stdout and "held-out loss" in stdout

    # in the dtype the prune computed in (bfloat16 on bf16 hardware), as the search measured it
    model, tok = models.load_model(out, dtype=models.compute_dtype("auto", "cpu"))
    assert models.count_parameters(model) == best["parameters"]
    assert model.config.num_hidden_layers == best["shape"]["layers"]
    _, held = P.search_split(P.calibration_texts(calib_file))
    ids = P.calibration_batch(tok, held, 4, 16, seed=0)
    assert (len(held), *ids.shape) == (1, 2, 16)  # one held-out text of the ten
    assert (table["held_out"]["texts"], table["held_out"]["sequences"]) == (1, 2)
    assert P.heldout_loss(model, ids) == pytest.approx(best["held_out_loss"], rel=1e-6)
    teacher, _ = models.load_model(tiny_llama, dtype=models.compute_dtype("auto", "cpu"))
    assert P.heldout_loss(teacher, ids) == pytest.approx(table["teacher_loss"], rel=1e-6)
    assert not list(tmp_path.glob(".searched*")), "temporary folder left behind"


def test_search_is_a_recipe_option(tmp_path):
    from slmkit.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("teacher: default\ntask: summarize\nstages:\n  prune: {target: 0.5, search: 4}\n")
    assert load_recipe(path).stages["prune"] == {"target": 0.5, "search": 4}


def test_held_out_lines_never_calibrate(tmp_path):
    """Importance is measured on training lines only: a line marked "split": "eval" is what the
    student is scored on, so it must not choose what the student keeps."""
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"input": "kept text", "split": "train"}) + "\n"
                     + json.dumps({"input": "held-out text", "split": "eval"}) + "\n"
                     + json.dumps({"input": "unmarked text"}) + "\n")
    assert P.calibration_texts(str(calib)) == ["kept text", "unmarked text"]
    preset = P.calibration_texts(task="grammar")
    from slmkit.tasks import preset_data

    rows = [json.loads(line) for line in preset_data("grammar").read_text().splitlines()]
    held = [r["input"] for r in rows if r["split"] == "eval"]
    assert len(preset) == len(rows) - len(held) and held
    assert not any(h in t for t in preset for h in held)


# --------------------------------------------------------------------------- MLP refit

def test_refit_reproduces_the_mlp_output_better_than_slicing(tiny_model):
    """Every layer and hidden channel kept, MLP 64 -> 24: layer 0's MLP then sees exactly the
    teacher's input, so its output error can be measured directly. Refitting must lower it on the
    calibration tokens, the record must report that same error, and without refit_ids cut() must
    leave the sliced weights alone (Phi's fc2 refits its bias too)."""
    model, tok = models.load_model(tiny_model)
    from conftest import CORPUS

    ids = P.calibration_batch(tok, CORPUS, 4, 16)
    src = P.source_shape(model.config.to_dict())
    dst = replace(src, ffn=24)
    scores = P.measure_importance(model, ids)
    sliced, keep, _, none = P.cut(model, scores, src, dst)
    refitted, keep2, _, record = P.cut(model, scores, src, dst, refit_ids=ids)
    assert none is None and keep2 == keep

    def mlp0(m):  # layer 0's MLP output on the calibration tokens (tokens, D)
        got = []
        h = P._modules(m)[1][0][1].register_forward_hook(lambda mod, a, out: got.append(out))
        with torch.no_grad():
            m.model(input_ids=ids, use_cache=False)
        h.remove()
        return got[0].reshape(-1, got[0].shape[-1]).double()

    want = mlp0(model)

    def err(m):
        return float((mlp0(m) - want).pow(2).sum() / want.pow(2).sum())

    assert record["tokens"] == ids.numel() and len(record["error_after"]) == src.layers
    assert all(a < b for a, b in zip(record["error_after"], record["error_before"]))
    assert err(sliced) == pytest.approx(record["error_before"][0], rel=1e-3, abs=1e-6)
    assert err(refitted) == pytest.approx(record["error_after"][0], rel=1e-3, abs=1e-6)
    assert err(refitted) < err(sliced)
    ref = masked_reference(model, keep)  # the sliced model is still exactly the masked one
    assert (logits(sliced) - logits(ref)).abs().max() < 1e-5


def test_refit_is_off_by_default_and_recorded(tiny_llama, calib_file, tmp_path, cli):
    code, _, err = cli("prune", tiny_llama, "--ffn", "32", "--calib", calib_file, "--out",
                       tmp_path / "a", "--num-samples", "4", "--seq-len", "16", "--refit")
    assert code == 0, err
    code, _, err = cli("prune", tiny_llama, "--ffn", "32", "--calib", calib_file, "--out",
                       tmp_path / "b", "--num-samples", "4", "--seq-len", "16")
    assert code == 0, err
    a = json.loads((tmp_path / "a" / "prune_plan.json").read_text())["mlp_refit"]
    b = json.loads((tmp_path / "b" / "prune_plan.json").read_text())["mlp_refit"]
    assert b is None and a["ridge"] == P.REFIT_RIDGE and a["tokens"] == 4 * 16
    down = "model.layers.0.mlp.down_proj.weight"
    wa = models.load_model(tmp_path / "a")[0].state_dict()[down]
    wb = models.load_model(tmp_path / "b")[0].state_dict()[down]
    assert wa.shape == wb.shape and not torch.allclose(wa, wb)


def test_distill_reads_the_layer_and_channel_map_from_the_plan(tiny_llama, tmp_path):
    # --hidden-kd matches student layer j to the teacher layer it was cut from: the plan that
    # slm prune writes must name those layers and the hidden channels kept
    from slmkit.distill import layer_pairs

    t_cfg = models.load_model(tiny_llama)[0].config
    plan = P.prune(P.PruneConfig(tiny_llama, tmp_path / "p", task="summarize", num_samples=2, seq_len=16,
                                 shape={"layers": 3, "hidden": t_cfg.hidden_size // 2}))
    s_cfg = models.load_model(tmp_path / "p")[0].config
    pairs, channels = layer_pairs(tmp_path / "p", s_cfg, t_cfg)
    assert [t for _, t in pairs] == plan["kept"]["layers"][:2] and len(set(plan["kept"]["layers"])) == 3
    assert channels == plan["kept"]["hidden"] and len(channels) == s_cfg.hidden_size
