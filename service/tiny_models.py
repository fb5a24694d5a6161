"""Tiny real HF checkpoints (real transformers classes, real safetensors files) for the demo and the tests.

"Fine-tunes" here are the base plus seeded low-rank and dense perturbations: enough to exercise every code path of
a static merge. Quality claims use real fine-tunes (benchmarks), never these.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    CLIPConfig,
    CLIPForImageClassification,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

TINY = {
    "vit": lambda: ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8, patch_size=4, num_channels=1),
    "clip_vision": lambda: CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8, patch_size=4, projection_dim=16),
    "bert": lambda: BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=64, max_position_embeddings=32),
    "roberta": lambda: RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=64, max_position_embeddings=40),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0),
    "llama": lambda: LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=32),
}
# (backbone class for the base, class for the task models)
CLASSES = {
    "vit": (ViTModel, ViTForImageClassification),
    "clip_vision": (CLIPVisionModel, CLIPForImageClassification),
    "bert": (BertModel, BertForSequenceClassification),
    "roberta": (RobertaModel, RobertaForSequenceClassification),
    "gpt2": (GPT2Model, GPT2ForSequenceClassification),
    "llama": (LlamaForCausalLM, LlamaForCausalLM),
}


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Add a seeded low-rank + dense change to every float parameter (a stand-in for fine-tuning)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                m, n = p.shape
                r = max(1, min(m, n) // 4)
                low = torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen) / r
                p.add_(scale * low + 0.2 * scale * torch.randn(p.shape, generator=gen))
            else:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def make_family(kind: str, root: Path, num_tasks: int = 3, seed: int = 0, num_labels: tuple[int, ...] = (3, 4, 5),
                dtype: torch.dtype = torch.float32, sizes: dict | None = None) -> tuple[Path, dict[str, Path]]:
    """Save a base and `num_tasks` task models of one architecture under root; returns (base dir, task dirs).

    `sizes` overrides config fields (e.g. hidden_size, num_hidden_layers) for larger random-init families.
    """
    base_cls, task_cls = CLASSES[kind]
    torch.manual_seed(seed)
    config = _config(kind, sizes)
    base = base_cls(config).to(dtype)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tasks = {}
    for t in range(num_tasks):
        cfg = _config(kind, sizes)
        if kind == "clip_vision":  # CLIPForImageClassification takes the full CLIP config around the vision one
            cfg = CLIPConfig(vision_config=cfg.to_dict(), text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 48, "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1})
        if task_cls is not base_cls:
            cfg.num_labels = num_labels[t % len(num_labels)]
            if kind == "gpt2":
                cfg.pad_token_id = 0
        torch.manual_seed(seed + 100 + t)
        model = task_cls(cfg).to(dtype)
        backbone = getattr(model, model.base_model_prefix, model) if task_cls is not base_cls else model
        backbone.load_state_dict(base.state_dict(), strict=False)  # task backbones may lack the base's pooler
        perturb_(backbone, seed=seed * 1000 + t + 1)
        tasks[f"task{t}"] = root / f"task{t}"
        model.save_pretrained(tasks[f"task{t}"])
    return base_dir, tasks


def _config(kind: str, sizes: dict | None):
    config = TINY[kind]()
    config.update(sizes or {})
    return config
