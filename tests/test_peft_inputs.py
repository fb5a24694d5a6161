"""PEFT LoRA adapters as fine-tuned inputs: real adapters built with `peft` on tiny HF models merge exactly as their
`merge_and_unload()` full models do (static methods and AdaRank), mixed with full inputs; bad adapters stop in one
line."""

import json
from contextlib import ExitStack

import pytest
import yaml
import torch
from peft import LoHaConfig, LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForCausalLM

from rankmerge.service.cli import main
from rankmerge.service.spec import job_from_dict
from rankmerge.service.merge_job import open_inputs
from rankmerge.service.tta_job import build_merger
from rankmerge.workers import static_merge
from rankmerge.workers.checkpoint_reader import ModelCheckpoint
from rankmerge.workers.methods import spectral as sp
from rankmerge.workers.methods.registry import MergeContext, make_method
from rankmerge.workers.methods.svd import lowrank_svd, thin_svd
from rankmerge.workers.peft_adapter import open_model
from rankmerge.workers.plan import build_plan
from rankmerge.workers.static_merge import is_unformed, load_inputs

from conftest import cli_merge, run_local_and_ray

TASKS = ("t0", "t1")

def randomize_lora_(model, seed: int) -> None:
    """LoRA starts with B = 0 (no change): give every factor seeded values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "modules_to_save" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))

def build_family(root, make_model, lora_config, *, base_dtype=torch.float32):
    """(base dir, {task: adapter dir}, {task: merge_and_unload dir}) from one seeded base."""
    torch.manual_seed(0)
    make_model().to(base_dtype).save_pretrained(root / "base")
    adapters, full = {}, {}
    for t, name in enumerate(TASKS):
        model = get_peft_model(make_model().to(base_dtype), lora_config())
        randomize_lora_(model, seed=t + 1)
        adapters[name] = root / f"adapter_{name}"
        model.save_pretrained(adapters[name])
        full[name] = root / f"full_{name}"
        model.merge_and_unload().save_pretrained(full[name])
    return root / "base", adapters, full

def base_model_of(make_model):
    def make():
        torch.manual_seed(0)  # every task starts from the same base weights
        return make_model()
    return make

def tiny_gpt2():
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0, num_labels=3)
    return GPT2ForSequenceClassification(cfg)

def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32))

def gpt2_lora():
    # Every rank is at least TSV-M's ⌊32/2⌋ kept components: below it the dense SVD of the merged model has σ ≈ rounding
    # with noise directions, which TSV-M's polar step mixes in; from the adapter they are zero (test_tsv_m_below_...).
    # Conv1D (fan_in_fan_out), rsLoRA, a rank and an alpha pattern, and the classifier as modules_to_save
    return LoraConfig(r=16, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], task_type="SEQ_CLS", use_rslora=True,
                      rank_pattern={"h.1.mlp.c_fc": 20}, alpha_pattern={"h.0.attn.c_proj": 3})

def llama_lora():
    return LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")

@pytest.fixture(scope="module")
def gpt2_family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("gpt2"), base_model_of(tiny_gpt2), gpt2_lora)

@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("llama"), base_model_of(tiny_llama), llama_lora)

def assert_same_state(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")

@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", ["lambda=0.5"]),
    ("ties", ["k=0.3", "lambda=0.7"]),
    ("tsv_m", []),
    ("ta_svd", ["rho=0.25", "lambda=0.5"]),
])
@pytest.mark.parametrize("family", ["gpt2_family", "llama_family"])
def test_adapters_merge_as_their_merged_models(request, tmp_path, family, method, params):
    base, adapters, full = request.getfixturevalue(family)
    expected = cli_merge(base, full, method, tmp_path / "full", *params)
    assert_same_state(cli_merge(base, adapters, method, tmp_path / "adapters", *params), expected)
    mixed = {"t0": full["t0"], "t1": adapters["t1"]}
    assert_same_state(cli_merge(base, mixed, method, tmp_path / "mixed", *params), expected)
    if family == "gpt2_family":  # the classifier came from modules_to_save: each task's own head file
        for t in TASKS:
            heads = load_file(str(tmp_path / "adapters" / "heads" / f"{t}.safetensors"))
            torch.testing.assert_close(heads["score.weight"], load_file(str(full[t] / "model.safetensors"))["score.weight"])

@pytest.mark.parametrize("method,params", [("task_arithmetic", ["lambda=0.5"]), ("ties", ["k=0.3", "lambda=0.7"])])
def test_adapters_merge_in_row_blocks_as_their_merged_models(llama_family, tmp_path, monkeypatch, method, params):
    """Blocks of a few rows (a block of B·A is B's rows times A): still the merge of the merged models."""
    monkeypatch.setattr(static_merge, "PART_BYTES", 2048)
    base, adapters, full = llama_family
    expected = cli_merge(base, full, method, tmp_path / "full", *params)
    assert_same_state(cli_merge(base, adapters, method, tmp_path / "adapters", *params), expected)


def test_lowrank_svd_is_the_svd_of_the_product():
    gen = torch.Generator().manual_seed(0)
    left, right = torch.randn(40, 6, generator=gen), torch.randn(6, 24, generator=gen)
    u, s, vh = lowrank_svd(left, right, 10)
    torch.testing.assert_close(s[:6], thin_svd(left @ right)[1][:6], atol=1e-4, rtol=1e-5)
    assert s[6:].abs().max() == 0
    torch.testing.assert_close((u * s) @ vh, left @ right, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(u[:, :6].T @ u[:, :6], torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(vh[:6] @ vh[:6].T, torch.eye(6), atol=1e-5, rtol=0)
    assert u[:, 6:].abs().max() == 0 and vh[6:].abs().max() == 0  # no invented directions beyond the rank

def token_data(tmp_path) -> dict[str, str]:
    """Per task, 8 seeded rows of 6 token ids for the tiny Llama (unlabelled: adaptation data)."""
    data = {}
    for i, name in enumerate(TASKS):
        data[name] = str(tmp_path / f"{name}.safetensors")
        gen = torch.Generator().manual_seed(i)
        save_file({"input_ids": torch.randint(1, 64, (8, 6), generator=gen), "attention_mask": torch.ones(8, 6, dtype=torch.long)}, data[name])
    return data

@pytest.mark.parametrize("base_method", ["tsv_m", "ta_svd"])
def test_adarank_from_adapters_starts_where_it_does_from_merged_models(llama_family, tmp_path, base_method):
    base, adapters, full = llama_family
    data = token_data(tmp_path)

    def final_weights(models, out):
        spec = {"base": str(base), "models": {k: str(v) for k, v in models.items()}, "method": "adarank",
                "params": {"base": base_method}, "output": str(tmp_path / out),
                "tta": {"data": data, "steps": 1, "batch_size": 4, "objective": "entropy"}}
        with ExitStack() as stack:
            job = job_from_dict(spec, tmp_path)
            b, tasks, plan = open_inputs(job, stack)
            return build_merger(job, plan, b, tasks).final_weights()

    expected = final_weights(full, "full")
    got = final_weights(adapters, "adapters")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")

def broken_adapter(gpt2_family, tmp_path, edit):
    """A copy of a real adapter with one defect."""
    _, adapters, _ = gpt2_family
    out = tmp_path / "broken"
    out.mkdir()
    config = json.loads((adapters["t0"] / "adapter_config.json").read_text())
    weights = load_file(str(adapters["t0"] / "adapter_model.safetensors"))
    config, weights = edit(config, weights)
    (out / "adapter_config.json").write_text(json.dumps(config))
    if weights is not None:
        save_file(weights, str(out / "adapter_model.safetensors"))
    return out

@pytest.mark.parametrize("edit,phrase", [
    (lambda c, w: ({**c, "use_dora": True}, w), "use_dora"),
    (lambda c, w: ({**c, "peft_type": "IA3"}, w), "IA3 adapters are not supported"),
    (lambda c, w: (c, {k: v for k, v in w.items() if "h.0.attn.c_attn.lora_B" not in k}), "has only lora_A"),
    (lambda c, w: (c, {**w, "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector": torch.ones(96)}), "not a LoRA A/B factor"),
    (lambda c, w: ({**c, "r": 8, "rank_pattern": {}}, w), "has rank 16 but adapter_config.json says 8"),
    (lambda c, w: (c, {k: (v[:, :3].contiguous() if k.endswith("h.0.attn.c_attn.lora_A.weight") else v) for k, v in w.items()}), "do not make its base shape"),
    (lambda c, w: (c, {k.replace(".h.0.", ".h.9."): v for k, v in w.items()}), "which the base does not have"),
    (lambda c, w: (c, None), "has no adapter_model.safetensors"),
])
def test_bad_adapters_stop_in_one_line(gpt2_family, tmp_path, capsys, edit, phrase):
    base, _, full = gpt2_family
    bad = broken_adapter(gpt2_family, tmp_path, edit)
    capsys.readouterr()
    code = main(["merge", "--base", str(base), "--model", f"bad={bad}", "--model", f"t1={full['t1']}", "--method", "task_arithmetic",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and phrase in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()

def test_a_pickled_adapter_needs_allow_pickle_and_loha_is_refused(gpt2_family, tmp_path, capsys):
    base, adapters, full = gpt2_family
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapters["t0"] / "adapter_config.json").read_text())
    torch.save(load_file(str(adapters["t0"] / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    capsys.readouterr()
    args = ["merge", "--base", str(base), "--model", f"p={pickled}", "--model", f"t1={full['t1']}", "--method", "task_arithmetic",
            "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "pickle" in capsys.readouterr().err
    assert main(args + ["--allow-pickle"]) == 0
    loha = get_peft_model(tiny_llama(), LoHaConfig(r=2, target_modules=["q_proj"]))
    loha.save_pretrained(tmp_path / "loha")
    capsys.readouterr()
    assert main(["merge", "--base", str(base), "--model", f"l={tmp_path / 'loha'}", "--method", "task_arithmetic", "--out", str(tmp_path / "out2")]) == 2
    assert "LOHA adapters are not supported" in capsys.readouterr().err

def test_mergekit_config_and_dry_run_take_adapters(gpt2_family, tmp_path, capsys):
    """A mergekit YAML may list adapter folders; --dry-run plans and forecasts them (header reads plus one real tensor
    per shape) and writes nothing."""
    base, adapters, full = gpt2_family
    config = tmp_path / "mergekit.yml"
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                      "models": [{"model": str(adapters["t0"]), "parameters": {"weight": 0.5}},
                                                 {"model": str(full["t1"]), "parameters": {"weight": 0.5}}]}))
    assert main(["merge", str(config), "--out", str(tmp_path / "out")]) == 0
    expected = {"t0": full["t0"], "t1": full["t1"]}
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert_same_state(got, cli_merge(base, expected, "task_arithmetic", tmp_path / "ref", "lambda=0.5"))
    capsys.readouterr()
    assert main(["merge", "--base", str(base), "--model", f"t0={adapters['t0']}", "--model", f"t1={adapters['t1']}",
                 "--method", "tsv_m", "--out", str(tmp_path / "dry"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak memory" in out and "h.0.attn.c_attn.weight" in out
    assert not (tmp_path / "dry").exists()

def test_an_adapter_for_another_base_name_warns(gpt2_family, tmp_path, caplog):
    base, adapters, full = gpt2_family
    renamed = broken_adapter(gpt2_family, tmp_path, lambda c, w: ({**c, "base_model_name_or_path": "org/other-model"}, w))
    with caplog.at_level("WARNING"):
        cli_merge(base, {"r": renamed, "t1": full["t1"]}, "task_arithmetic", tmp_path / "out")
    assert any("trained on 'org/other-model'" in r.getMessage() for r in caplog.records)

def test_per_task_svd_methods_never_form_an_adapters_dense_task_vector(llama_family):
    """TA-SVD / TSV-M on adapter-only spectral tensors read the factors alone; a mixed tensor or CART reads densely."""
    base_dir, adapters, full = llama_family
    with ExitStack() as stack:
        base = stack.enter_context(ModelCheckpoint(base_dir, "base"))
        for models, formed in ((adapters, False), ({"t0": full["t0"], "t1": adapters["t1"]}, True)):
            tasks = [stack.enter_context(open_model(p, n, base)) for n, p in models.items()]
            plan = build_plan(base, {t.name: t for t in tasks})
            entry = next(e for e in plan.merged if e.key.endswith("layers.0.self_attn.q_proj.weight"))
            for method, from_factors in (("tsv_m", True), ("ta_svd", True), ("cart", False)):
                m = make_method(method, {}, MergeContext(TASKS, plan.merged_numel))
                assert m.from_factors(entry.role, entry.shape) is from_factors
                inputs = load_inputs(entry, base, tasks, factors_only=m.from_factors(entry.role, entry.shape))
                assert is_unformed(inputs.taus) is (from_factors and not formed)

def test_tsv_m_below_the_adapter_rank_whitens_only_the_true_directions():
    """⌊r_W/T⌋ > adapter rank: TSV-M from the factors equals TSV-M over exactly each task's r nonzero components."""
    gen = torch.Generator().manual_seed(0)
    factors = tuple((torch.randn(24, 3, generator=gen), torch.randn(3, 20, generator=gen)) for _ in range(2))
    taus = torch.stack([a @ b for a, b in factors])
    got = sp.tsv_factorization(taus, low_rank=factors).materialize()  # k = ⌊20/2⌋ = 10 > 3
    svds = [torch.linalg.svd(t.double(), full_matrices=False) for t in taus]
    u = torch.cat([s[0][:, :3] for s in svds], 1)
    vh = torch.cat([s[2][:3] for s in svds], 0)
    sv = torch.cat([s[1][:3] for s in svds])
    pu, _, qu = torch.linalg.svd(u, full_matrices=False)
    pv, _, qv = torch.linalg.svd(vh, full_matrices=False)
    expected = ((pu @ qu) * sv) @ (pv @ qv)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)

def named_keys(weights, name):
    """A save_pretrained file's keys as the live PEFT model's state_dict names them (adapter name inside)."""
    out = {}
    for k, v in weights.items():
        if ".lora_" in k:
            out[k.replace(".weight", f".{name}.weight")] = v
        else:  # modules_to_save: the trained copy under the adapter name, the base's copy beside it
            out[k.replace(".weight", f".modules_to_save.{name}.weight")] = v
            out[k.replace(".weight", ".original_module.weight")] = torch.zeros_like(v)
    return out

def test_keys_with_an_adapter_name_map_like_saved_ones(gpt2_family, tmp_path, capsys):
    base, adapters, full = gpt2_family
    named = broken_adapter(gpt2_family, tmp_path, lambda c, w: (c, named_keys(w, "cars")))
    models = {"t0": named, "t1": adapters["t1"]}
    assert_same_state(cli_merge(base, models, "task_arithmetic", tmp_path / "named"),
                      cli_merge(base, adapters, "task_arithmetic", tmp_path / "saved"))
    heads = load_file(str(tmp_path / "named" / "heads" / "t0.safetensors"))
    torch.testing.assert_close(heads["score.weight"], load_file(str(full["t0"] / "model.safetensors"))["score.weight"])
    two = tmp_path / "two"
    two.mkdir()
    (two / "adapter_config.json").write_text((named / "adapter_config.json").read_text())
    weights = load_file(str(named / "adapter_model.safetensors"))
    save_file({**weights, **{k.replace(".cars.", ".dtd."): v.clone() for k, v in weights.items() if ".cars." in k}}, str(two / "adapter_model.safetensors"))
    capsys.readouterr()
    assert main(["merge", "--base", str(base), "--model", f"two={two}", "--method", "task_arithmetic", "--out", str(tmp_path / "o")]) == 2
    assert "holds several adapters (cars, dtd)" in capsys.readouterr().err

@pytest.mark.parametrize("part_bytes", [None, 1024])
def test_an_embedding_lora_adds_peft_s_own_delta(tmp_path, monkeypatch, part_bytes):
    """LoRA on nn.Embedding (lora_embedding_A/B, stored transposed): task arithmetic at λ = 1 on one adapter gives the
    base plus the delta PEFT's own layer computes, also merged in blocks of a few rows."""
    if part_bytes:
        monkeypatch.setattr(static_merge, "PART_BYTES", part_bytes)
    base_dir = tmp_path / "base"
    base_model_of(tiny_llama)().save_pretrained(base_dir)
    model = get_peft_model(base_model_of(tiny_llama)(), LoraConfig(r=4, lora_alpha=12, target_modules=["embed_tokens"]))
    randomize_lora_(model, seed=3)
    model.save_pretrained(tmp_path / "adapter")
    layer = model.base_model.model.model.embed_tokens
    expected = layer.base_layer.weight.detach() + layer.get_delta_weight("default").detach()
    got = cli_merge(base_dir, {"t": tmp_path / "adapter"}, "task_arithmetic", tmp_path / "out", "lambda=1.0")
    torch.testing.assert_close(got["model.embed_tokens.weight"], expected, atol=1e-6, rtol=1e-6)


def test_mergekit_lora_references_merge_as_the_models_they_make(llama_family, tmp_path, monkeypatch, capsys):
    """`model: BASE+ADAPTER` in a mergekit config is the adapter on the base: the merge equals the same config over the
    adapters' merge_and_unload models; a LoRA on another model, or as the origin, is a one-line error."""
    base, adapters, full = llama_family
    monkeypatch.chdir(tmp_path)

    def run(models, out, base_model=str(base)):
        config = {"merge_method": "ties", "base_model": base_model, "parameters": {"weight": 0.6, "density": 0.5},
                  "models": [{"model": m} for m in models]}
        (tmp_path / f"{out}.yml").write_text(yaml.safe_dump(config))
        return main(["merge", f"{out}.yml", "--out", out])

    assert run([str(full[t]) for t in TASKS], "full") == 0
    assert run([f"{base}+{adapters[t]}" for t in TASKS], "lora") == 0
    assert_same_state(load_file(str(tmp_path / "lora" / "model.safetensors")), load_file(str(tmp_path / "full" / "model.safetensors")))
    capsys.readouterr()
    assert run([f"{full['t0']}+{adapters['t1']}"], "other") == 2
    err = capsys.readouterr().err
    assert "applies a LoRA to" in err and "merge_and_unload" in err and err.count("\n") == 1, err
    assert run([f"{base}+{adapters['t1']}"], "origin", base_model=f"{base}+{adapters['t0']}") == 2
    err = capsys.readouterr().err
    assert "a LoRA reference" in err and err.count("\n") == 1, err
    assert not any((tmp_path / out).exists() for out in ("other", "origin"))


@pytest.mark.slow
def test_adapters_on_the_ray_executor_learn_what_the_local_one_does(llama_family, tmp_path, monkeypatch):
    """Shards open the adapters themselves and factorize them from B·A on their side: a real local Ray run of AdaRank
    over adapter inputs learns the masks the in-process one learns, and publishes the same model."""
    base, adapters, _ = llama_family
    data = token_data(tmp_path)
    spec = {"base": str(base), "models": {k: str(v) for k, v in adapters.items()}, "method": "adarank",
            "params": {"base": "tsv_m"}, "resources": {"shards": 2, "workers": 1},
            "tta": {"data": data, "steps": 3, "batch_size": 4, "objective": "entropy", "select": "final", "lr": 0.05}}
    run_local_and_ray(spec, tmp_path, monkeypatch)
    assert_same_state(load_file(str(tmp_path / "ray" / "model.safetensors")), load_file(str(tmp_path / "local" / "model.safetensors")))
