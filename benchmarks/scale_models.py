"""Scale checkpoints for the anchor benchmarks: a base and T synthetic fine-tunes at real model sizes.

    .venv/bin/python benchmarks/scale_models.py vitl --tasks 20 --out .bench/scale/vitl
    .venv/bin/python benchmarks/scale_models.py llama1b --tasks 8 --out .bench/scale/llama1b

Three families, randomly initialised (this measures speed and memory at scale, not quality):

* ``vitl``: a CLIP ViT-L/14-shaped vision encoder. Base = ``CLIPVisionModel``; task t =
  ``CLIPForImageClassification`` (10 labels, its own seeded classifier head) whose backbone is
  base + a task vector; fp16 on disk. Plus ``data/t<i>.safetensors``: 32 unlabeled images
  (``pixel_values`` [32, 3, 224, 224] float32, seeded noise) per task for test-time adaptation.
* ``vitb32``: the same at CLIP ViT-B/32's shape (12 layers, width 768, patch 32), fp32 on disk
  (benchmarks/gpu_check.py).
* ``llama1b``: a TinyLlama-1.1B-shaped ``LlamaForCausalLM`` (untied), bf16 on disk. Plus
  ``data/t<i>.jsonl``: 32 prompts ``{"text": ...}`` per task. rankmerge tokenises .jsonl data
  with the base directory's tokenizer, so every model directory carries a small real byte-level
  BPE tokenizer trained here, offline, on a seeded word corpus (ids 0/1/2 = <unk>/<s>/</s>, as
  Llama's config expects; ~1k ids, well inside the 32000-row embedding).

Task vectors look like fine-tunes, so SVD truncation means something: every weight of two or
more dims (viewed as out x in) gets tau = A diag(sigma) B^T with orthonormal A, B of rank 64 and
sigma_i = 1/(1+i), scaled to ||tau||_F = 1e-2 ||W||_F, plus dense Gaussian noise holding 10% of
that norm; 1-D parameters get dense noise of 1e-2 x their RMS. Everything is seeded by (task
index, tensor name), so any subset of tasks regenerates bit for bit. Note that at bf16 a
per-entry change of 1% of the weight is only a couple of ulps: the stored task vectors carry
that rounding, as real bf16 fine-tunes do.

The CLIP base is stored with ``vision_model.``-prefixed tensor names, the layout of CLIP vision
checkpoints on the hub: transformers 5 writes a ``CLIPVisionModel`` without that prefix, and
transformers 4.x (which FusionBench needs) then silently re-initialises every weight. Both
versions read the prefixed layout.

Idempotent: every model directory gets ``spec.json`` and a ``.complete`` marker last, and is
reused while its spec matches (so ``--tasks 20`` after ``--tasks 3`` only writes 17 more). At
most two models are in memory at once: the base and the task being written.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rankmerge.workers.methods.elementwise import stable_seed

LOG = logging.getLogger("scale_models")
GB = 1e9
SPEC_FILE, DONE = "spec.json", ".complete"
TAU = {"rank": 64, "relative_norm": 1e-2, "noise_share": 0.1, "vector_rms_floor": 1e-2, "version": 1}
DATA_ROWS = 32


@dataclass(frozen=True)
class Family:
    """One model family: its config, dtype on disk, and how base, task and data are built."""

    config: dict
    dtype: torch.dtype
    build_base: Callable[[dict, torch.dtype], torch.nn.Module]
    task_skeleton: Callable[[dict, torch.dtype], torch.nn.Module]
    base_prefix: str  # prepended to the base's tensor names on disk (see the module docstring)
    write_data: Callable[[Path, list[str], dict], None]
    data_suffix: str
    side_files: Callable[[Path], None] = lambda _dir: None


# --------------------------------------------------------------------------- family builders
# Models are built directly in the storage dtype (_from_config(dtype=...)): no fp32 copy of a 1B model is made.
def clip_base(cfg: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The bare vision tower: what a CLIP fine-tune starts from."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel._from_config(CLIPVisionConfig(**cfg), dtype=dtype)


def clip_task(cfg: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The tower wrapped with a 10-way classifier: how a CLIP fine-tune is saved."""
    from transformers import CLIPConfig, CLIPForImageClassification

    return CLIPForImageClassification._from_config(CLIPConfig(vision_config=cfg, num_labels=10), dtype=dtype)


def llama_model(cfg: dict, dtype: torch.dtype) -> torch.nn.Module:
    """Base and fine-tunes alike: a causal LM (untied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM._from_config(LlamaConfig(**cfg), dtype=dtype)


def write_images(data_dir: Path, tasks: list[str], cfg: dict) -> None:
    """Seeded noise images per task: enough for entropy-based test-time adaptation to run."""
    size = cfg["image_size"]
    for i, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(stable_seed("images", i))
        pixels = torch.randn(DATA_ROWS, 3, size, size, generator=gen)
        save_file({"pixel_values": pixels}, str(data_dir / f"{task}.safetensors"))


WORDS = ("the model merge task vector weight layer image text train test data token each one two many "
         "small large fast slow read write learn adapt answer question number color animal city river "
         "book music game food plant star light water stone tree road house door window table paper "
         "story summary list reason step first next last always never often because while after before "
         "find count name describe explain compare translate classify sort choose give show tell").split()


def sentences(seed: int, count: int) -> list[str]:
    """Deterministic English-like sentences: tokenizer corpus and prompts alike."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = rng.choices(WORDS, k=rng.randint(6, 24))
        out.append(" ".join(words).capitalize() + rng.choice((".", "?", "!")))
    return out


def write_prompts(data_dir: Path, tasks: list[str], _cfg: dict) -> None:
    """One .jsonl of prompts per task, in the format rankmerge's data loader reads."""
    for i, task in enumerate(tasks):
        lines = [json.dumps({"text": s}) for s in sentences(stable_seed("prompts", i), DATA_ROWS)]
        (data_dir / f"{task}.jsonl").write_text("\n".join(lines) + "\n")


def save_tokenizer(model_dir: Path) -> None:
    """A small real byte-level BPE, trained offline: .jsonl task data needs a tokenizer next to the base."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sentences(0, 2000), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(model_dir)


VITL = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "patch_size": 14, "image_size": 224, "projection_dim": 768}
VITB32 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "patch_size": 32, "image_size": 224, "projection_dim": 512}
LLAMA1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
           "tie_word_embeddings": False}
FAMILIES = {
    "vitl": Family(VITL, torch.float16, clip_base, clip_task, "vision_model.", write_images, ".safetensors"),
    "vitb32": Family(VITB32, torch.float32, clip_base, clip_task, "vision_model.", write_images, ".safetensors"),
    "llama1b": Family(LLAMA1B, torch.bfloat16, llama_model, llama_model, "", write_prompts, ".jsonl", save_tokenizer),
}


# --------------------------------------------------------------------------- task vectors
def low_rank_delta(w: Tensor, gen: torch.Generator) -> Tensor:
    """A fine-tune-like update of a matrix (trailing dims flattened): rank-64 decaying spectrum + 10% dense noise."""
    mat = w.float().reshape(w.shape[0], -1)
    m, n = mat.shape
    r = min(TAU["rank"], m, n)
    a = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q
    b = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
    sigma = 1.0 / (1.0 + torch.arange(r, dtype=torch.float32))
    delta = (a * sigma) @ b.T  # orthonormal factors: ||delta||_F = ||sigma||
    delta.mul_(TAU["relative_norm"] * float(mat.norm()) / float(sigma.norm()))
    noise = torch.randn(m, n, generator=gen)
    delta.add_(noise, alpha=TAU["noise_share"] * float(delta.norm()) / max(float(noise.norm()), 1e-12))
    return delta.reshape(w.shape)


def dense_delta(w: Tensor, gen: torch.Generator) -> Tensor:
    """Small dense noise for vectors (norms, biases), relative to their RMS (floored: biases start at 0)."""
    rms = max(float(w.float().pow(2).mean().sqrt()), TAU["vector_rms_floor"])
    return torch.randn(w.shape, generator=gen) * (TAU["relative_norm"] * rms)


def fine_tuned(key: str, w: Tensor, task_index: int) -> Tensor:
    """base + tau for one tensor, in the checkpoint's dtype; integer tensors are copied."""
    if not w.is_floating_point():
        return w.clone()
    gen = torch.Generator().manual_seed(stable_seed("tau", task_index, key))
    delta = low_rank_delta(w, gen) if w.dim() >= 2 else dense_delta(w, gen)
    return delta.add_(w.float()).to(w.dtype)


def seeded_head(key: str, like: Tensor, task_index: int) -> Tensor:
    """A per-task classifier head (weights N(0, 0.02^2), zero bias)."""
    if key.endswith("bias"):
        return torch.zeros_like(like)
    gen = torch.Generator().manual_seed(stable_seed("head", task_index, key))
    return (torch.randn(like.shape, generator=gen) * 0.02).to(like.dtype)


# --------------------------------------------------------------------------- writing
def is_current(model_dir: Path, spec: dict) -> bool:
    """A model directory is reused only when it was finished with exactly this spec."""
    spec_file = model_dir / SPEC_FILE
    return (model_dir / DONE).exists() and spec_file.exists() and json.loads(spec_file.read_text()) == spec


def start(model_dir: Path) -> None:
    """Clear a stale or half-written directory before writing into it."""
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)


def finish(model_dir: Path, spec: dict) -> None:
    """Spec first, marker last: an interrupted write is never mistaken for a finished one."""
    (model_dir / SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    (model_dir / DONE).touch()


def read_state(model_dir: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint directory, as stored."""
    state: dict[str, Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


def add_prefix(model_dir: Path, prefix: str) -> None:
    """Rename the stored tensors to `prefix` + name (single-file checkpoints; see the module docstring)."""
    if not prefix:
        return
    shard = model_dir / "model.safetensors"
    if not shard.exists():
        raise RuntimeError(f"{model_dir}: expected one model.safetensors to rename")
    state = load_file(str(shard))
    save_file({prefix + k: v for k, v in state.items()}, str(shard), metadata={"format": "pt"})


def write_base(family: Family, cfg: dict, model_dir: Path, spec: dict) -> None:
    """Random-init base saved with save_pretrained in the family's dtype."""
    start(model_dir)
    torch.manual_seed(spec["seed"])
    model = family.build_base(cfg, family.dtype).eval()
    model.save_pretrained(model_dir)
    del model
    add_prefix(model_dir, family.base_prefix)
    family.side_files(model_dir)
    finish(model_dir, spec)


def write_task(family: Family, cfg: dict, base: dict[str, Tensor], task_index: int, model_dir: Path,
               spec: dict) -> None:
    """The task model class, uninitialised, filled tensor by tensor with base + tau (and its own head)."""
    from transformers.initialization import no_init_weights

    start(model_dir)
    with no_init_weights():
        model = family.task_skeleton(cfg, family.dtype)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            tensor.copy_(fine_tuned(key, base[key], task_index) if key in base else seeded_head(key, tensor, task_index))
    model.save_pretrained(model_dir)
    family.side_files(model_dir)
    finish(model_dir, spec)


def ensure_data(family: Family, cfg: dict, out: Path, tasks: list[str], spec: dict) -> bool:
    """Per-task unlabeled data, rewritten when any file is missing or the spec changed; True when reused."""
    data_dir = out / "data"
    if (data_dir / SPEC_FILE).exists() and json.loads((data_dir / SPEC_FILE).read_text()) == spec \
            and all((data_dir / f"{t}{family.data_suffix}").exists() for t in tasks):
        LOG.info("reusing data in %s", data_dir)
        return True
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / SPEC_FILE).unlink(missing_ok=True)
    family.write_data(data_dir, tasks, cfg)
    (data_dir / SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    return False


def dir_bytes(path: Path) -> int:
    """Disk size of a directory: what the summary reports."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def generate(name: str, tasks: int, out: Path, layers: int | None = None, seed: int = 0) -> list[tuple[str, float, int, bool]]:
    """Write (or reuse) base, t0..t{tasks-1} and data under `out`; returns (dir, seconds, bytes, reused) rows."""
    family = FAMILIES[name]
    cfg = dict(family.config, **({"num_hidden_layers": layers} if layers else {}))
    base_spec = {"family": name, "config": cfg, "dtype": str(family.dtype), "seed": seed, "prefix": family.base_prefix}
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reused = is_current(out / "base", base_spec)
    if not reused:
        LOG.info("writing %s", out / "base")
        write_base(family, cfg, out / "base", base_spec)
    rows.append(("base", time.perf_counter() - t0, dir_bytes(out / "base"), reused))
    base = None
    names = [f"t{i}" for i in range(tasks)]
    for i, task in enumerate(names):
        spec = {"base": base_spec, "task_index": i, "tau": TAU}
        t0 = time.perf_counter()
        reused = is_current(out / task, spec)
        if not reused:
            base = base if base is not None else read_state(out / "base")
            LOG.info("writing %s", out / task)
            write_task(family, cfg, base, i, out / task, spec)
        rows.append((task, time.perf_counter() - t0, dir_bytes(out / task), reused))
    t0 = time.perf_counter()
    reused = ensure_data(family, cfg, out, names, {"base": base_spec, "rows": DATA_ROWS})
    rows.append(("data", time.perf_counter() - t0, dir_bytes(out / "data"), reused))
    return rows


def main() -> None:
    """Generate (or reuse) one family's set and print what it wrote."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("--tasks", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, help="override the number of layers (small development runs)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the base's random init")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    rows = generate(args.family, args.tasks, args.out, args.layers, args.seed)
    total = time.perf_counter() - t0
    print(f"\n{args.family}: {args.tasks} tasks in {args.out}\n")
    print("| dir | s | GB | |\n|---|---:|---:|---|")
    for name, seconds, size, reused in rows:
        print(f"| {name} | {seconds:.1f} | {size / GB:.2f} | {'reused' if reused else 'written'} |")
    print(f"| total | {total:.1f} | {sum(r[2] for r in rows) / GB:.2f} | |")


if __name__ == "__main__":
    sys.exit(main())
