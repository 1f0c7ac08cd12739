"""megamft's LoRA against PEFT's on the transformers model: the same logits and gradients at TP=1, TP=2
and PP=2, PEFT adapters exported by megamft-convert, dropout and rank-stabilized scaling.

PEFT (peft.LoraConfig / PeftModel) on transformers is the reference throughout; megamft runs its real
megatron layers on several processes.
"""

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jobs  # noqa: E402
import lora_jobs  # noqa: E402
from hf_models import tiny_model  # noqa: E402

from megamft.checkpoint import hf_convert  # noqa: E402
from megamft.testing.distributed import launch  # noqa: E402

DENSE = transformers.LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LORA = (
    "lora.enabled=true",
    "lora.rank=4",
    "lora.alpha=8",
    "lora.targets=[all-linear]",
    "lora.use_rslora=true",
    "train.precision=fp32",
)
LAYOUTS = {
    "tp1": (1, ()),
    "tp2": (2, ("parallel.tensor_model_parallel_size=2",)),
    "pp2": (2, ("parallel.pipeline_model_parallel_size=2",)),
}
# PEFT adapts q, k and v (gate and up) apart; megatron's fused projection shares one A among them.
FUSED_WITH = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj", "w3": "w1"}


def _train_adapters(root: Path, megatron_dir: Path, lora_overrides=LORA) -> Path:
    """Two LoRA steps at a large learning rate from the converted base, saved as adapters only."""
    run = root / "run"
    overrides = lora_overrides + (
        "train.train_steps=2",
        "train.lr_warmup_steps=1",
        "optimizer.lr=0.05",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "data.seq_length=128",
        "data.max_samples_per_task=16",
        "data.valid_samples_per_task=2",
        f"checkpoint.load_dir={megatron_dir}",
        "checkpoint.load_optimizer=false",
        f"checkpoint.save_dir={run}",
        "lora.save_adapters_only=true",
    )
    launch(
        jobs.train,
        1,
        timeout=300,
        kwargs=dict(overrides=overrides, config_files=(str(megatron_dir / "megamft_model.yaml"),)),
    )
    return run


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """(hf folder, converted base, adapter-only run, its PEFT export, the merged export)."""
    root = tmp_path_factory.mktemp("lora_peft")
    tiny_model(DENSE).save_pretrained(root / "hf")
    megatron_dir = hf_convert.hf_to_megatron(root / "hf", root / "megatron").parent
    run = _train_adapters(root, megatron_dir)
    adapter = hf_convert.megatron_to_peft(run, root / "adapter", hf_template=root / "hf")
    merged = hf_convert.megatron_to_hf(run, root / "merged", hf_template=root / "hf")
    return root / "hf", megatron_dir, run, adapter, merged


def _peft_model(hf_dir: Path, adapter: Path):
    """PEFT's model of the exported adapter over the base (PeftModel.from_pretrained); fails on any missing or
    unexpected adapter key (load_adapter's result for the same folder)."""
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    result = model.load_adapter(adapter, adapter_name="check")
    assert not result.missing_keys and not result.unexpected_keys, (
        result.missing_keys,
        result.unexpected_keys,
    )
    model.delete_adapter("check")
    model.set_adapter("default")
    return model


def _peft_logits_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    logits = model(batch["tokens"]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    loss.backward()
    grads = {
        n.removesuffix(".default.weight") + ".weight": p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return logits.detach(), grads


def _fused_sums(grads: dict) -> dict:
    """PEFT's gradients of A summed over the projections megatron fuses (its one A gets their sum)."""
    summed = dict(grads)
    for name, grad in grads.items():
        module, leaf, rest = _split(name)
        if rest == "lora_A.weight" and leaf in FUSED_WITH:
            summed[f"{module}.{FUSED_WITH[leaf]}.{rest}"] = (
                summed[f"{module}.{FUSED_WITH[leaf]}.{rest}"] + grad
            )
    return summed


def _split(name: str):
    """'...self_attn.k_proj.lora_A.weight' -> ('...self_attn', 'k_proj', 'lora_A.weight')."""
    stem, _, rest = name.rpartition(".lora_")
    module, _, leaf = stem.rpartition(".")
    return module, leaf, "lora_" + rest


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_and_gradients_equal_peft_on_transformers(dense_run, layout, tmp_path):
    """At each layout megamft's LoRA gives PEFT's logits and PEFT's adapter gradients (q/k/v and gate/up
    A gradients summed, since megatron's fused projection has one A)."""
    from safetensors.torch import load_file

    hf_dir, megatron_dir, run, adapter, _ = dense_run
    batch = lora_jobs.causal_batch(2, 24, DENSE.vocab_size)
    world, overrides = LAYOUTS[layout]
    ours = next(
        r
        for r in launch(
            lora_jobs.logits_and_adapter_grads,
            world,
            timeout=300,
            kwargs=dict(
                checkpoint=str(run),
                model_yaml=str(megatron_dir / "megamft_model.yaml"),
                overrides=LORA + overrides,
                batch=batch,
                grads_dir=str(tmp_path / "grads"),
            ),
        )
        if r is not None
    )
    model = _peft_model(hf_dir, adapter)
    logits, grads = _peft_logits_and_grads(model, batch)
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(batch["tokens"]).logits
    assert (logits - base_logits).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(ours["logits"][..., : DENSE.vocab_size], logits, rtol=0, atol=2e-5)

    exported = hf_convert.megatron_to_peft(
        tmp_path / "grads", tmp_path / "grads_peft", hf_template=hf_dir
    )
    ours_grads = {
        k.removeprefix("base_model.model."): v
        for k, v in load_file(exported / "adapter_model.safetensors").items()
    }
    theirs = _fused_sums({k.removeprefix("base_model.model."): v for k, v in grads.items()})
    assert ours_grads.keys() == theirs.keys()
    scale = max(g.abs().max() for g in theirs.values())
    for name, grad in ours_grads.items():
        module, leaf, rest = _split(name)
        want = (
            theirs[f"{module}.{FUSED_WITH.get(leaf, leaf)}.{rest}"]
            if rest == "lora_A.weight"
            else theirs[name]
        )
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-5 * scale, msg=name)


def test_peft_adapter_loads_cleanly_and_equals_the_merged_export(dense_run):
    hf_dir, _, _, adapter, merged = dense_run
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    model = _peft_model(hf_dir, adapter)
    tokens = lora_jobs.causal_batch(2, 24, DENSE.vocab_size)["tokens"]
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens).logits, merged_model(tokens).logits, rtol=0, atol=2e-5
        )


def test_cli_writes_the_peft_adapter(dense_run, tmp_path):
    import subprocess
    import sys

    hf_dir, _, run, _, _ = dense_run
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "tools" / "convert_checkpoint.py"),
            "megatron-to-hf",
            "--checkpoint",
            str(run),
            "--out",
            str(tmp_path / "a"),
            "--hf-template",
            str(hf_dir),
            "--adapters-only",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(hf_dir.resolve())


LAYER_CASES = [
    (dropout, rslora, kind)
    for kind in ("column", "row")
    for dropout, rslora in ((0.0, False), (0.3, True))
]


@pytest.fixture(scope="module")
def layer_outputs():
    return launch(
        lora_jobs.tiny_lora_layer_outputs, 1, timeout=120, kwargs=dict(cases=LAYER_CASES, seed=7)
    )[0]


@pytest.mark.parametrize(
    "case", range(len(LAYER_CASES)), ids=lambda i: "-".join(map(str, LAYER_CASES[i]))
)
def test_one_layer_equals_peft_with_dropout_and_rslora(layer_outputs, case):
    """A LoRA-aware megatron linear (TP=1, training mode) and PEFT's LoRA Linear over the same weight, A, B and
    seed give the same output and gradients: the same dropout mask on the adapter's input, the same scale."""
    dropout, use_rslora, _ = LAYER_CASES[case]
    out = layer_outputs[case]
    linear = torch.nn.Linear(24, 40, bias=False)
    with torch.no_grad():
        linear.weight.copy_(out["weight"])
    model = torch.nn.Sequential(OrderedDict(proj=linear))
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=dropout, use_rslora=use_rslora
    )
    model = peft.inject_adapter_in_model(config, model)
    layer = model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(out["A"])
        layer.lora_B["default"].weight.copy_(out["B"])
    layer.train()
    x = out["x"].clone().requires_grad_()
    torch.manual_seed(7)
    y = model(x)
    y.pow(2).sum().backward()
    for ours, theirs in (
        (out["out"], y.detach()),
        (out["x_grad"], x.grad),
        (out["A_grad"], layer.lora_A["default"].weight.grad),
        (out["B_grad"], layer.lora_B["default"].weight.grad),
    ):  # fp32, summed in other orders
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max())
    if dropout:  # the adapter saw a masked input: without the mask the output would differ
        scale = 8 / 4**0.5
        unmasked = out["x"] @ out["weight"].T + scale * out["x"] @ out["A"].T @ out["B"].T
        assert (unmasked - out["out"]).abs().max() > 1e-2


MOE_BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
MOE_CASES = {
    # every linear, routed experts included: PEFT fuses the per-expert adapters into transformers 5's
    # experts (rank 2r for gate_up). Not with rsLoRA: that fusion doubles r and alpha, which keeps
    # alpha / r but not alpha / sqrt(r) (PEFT 0.21.2's transformers_weight_conversion).
    "mixtral-all-linear": (
        transformers.MixtralConfig,
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
        ("lora.targets=[all-linear]",),
    ),
    # attention and the shared expert: a regular expression selects them (the routed experts' gate_proj
    # is left out). Routed experts are not: PEFT 0.21.2 does not convert Qwen2-MoE's per-expert adapters
    # for transformers 5 and drops them (load_adapter lists them as unexpected).
    "qwen2-moe-shared-expert": (
        transformers.Qwen2MoeConfig,
        dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
        (
            "lora.targets=[linear_qkv,linear_proj,shared_experts.linear_fc1,shared_experts.linear_fc2]",
        ),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_adapters_equal_peft_on_transformers(case, tmp_path):
    """Mixture-of-experts LoRA (routed experts per expert, the shared expert) exported for PEFT: the logits of
    PEFT's model equal megamft's at EP=1 and EP=2, and the merged export's."""
    config_class, extra, targets = MOE_CASES[case]
    tiny_model(config_class(**MOE_BASE, **extra)).save_pretrained(tmp_path / "hf")
    megatron_dir = hf_convert.hf_to_megatron(tmp_path / "hf", tmp_path / "megatron").parent
    lora = tuple(o for o in LORA if not o.startswith(("lora.targets", "lora.use_rslora"))) + targets
    run = _train_adapters(tmp_path, megatron_dir, lora_overrides=lora)
    adapter = hf_convert.megatron_to_peft(run, tmp_path / "adapter", hf_template=tmp_path / "hf")
    merged = hf_convert.megatron_to_hf(run, tmp_path / "merged", hf_template=tmp_path / "hf")
    tokens = lora_jobs.causal_batch(2, 24, MOE_BASE["vocab_size"])["tokens"]
    with torch.no_grad():
        theirs = _peft_model(tmp_path / "hf", adapter)(tokens).logits
        torch.testing.assert_close(
            transformers.AutoModelForCausalLM.from_pretrained(merged)(tokens).logits,
            theirs,
            rtol=0,
            atol=2e-5,
        )
        base = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "hf", dtype=torch.float32
        )
        assert (base(tokens).logits - theirs).abs().max() > 1e-2
    for world, layout in ((1, ()), (2, ("parallel.expert_model_parallel_size=2",))):
        ours = next(
            r
            for r in launch(
                lora_jobs.logits_and_adapter_grads,
                world,
                timeout=300,
                kwargs=dict(
                    checkpoint=str(run),
                    model_yaml=str(megatron_dir / "megamft_model.yaml"),
                    overrides=lora + layout,
                    batch={"tokens": tokens},
                    grads_dir=None,
                ),
            )
            if r is not None
        )
        torch.testing.assert_close(
            ours["logits"][..., : MOE_BASE["vocab_size"]], theirs, rtol=0, atol=2e-5
        )
