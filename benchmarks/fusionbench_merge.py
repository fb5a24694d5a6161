"""FusionBench's own static merge of local checkpoints: load, merge, save, the way a FusionBench user does it.

Runs INSIDE FusionBench's venv (benchmarks/fusionbench-requirements.txt), started as a
subprocess by benchmarks/anchors.py, which times the whole process (imports, load, merge,
save) next to rankmerge and mergekit on the same files:

    .bench/venvs/fusionbench/bin/python benchmarks/fusionbench_merge.py --pool clip_vision \\
        --dtype float16 --base BASE --model t0=DIR0 --model t1=DIR1 --method ties \\
        --param scaling_factor=0.3 --param threshold=0.2 --out OUT

The model pool is FusionBench's (``CLIPVisionModelPool`` for CLIP vision encoders, each model
given as the ``transformers.CLIPVisionModel.from_pretrained`` config its docs show, with
``torch_dtype``; ``CausalLMPool`` with ``model_kwargs.torch_dtype`` for causal LMs, its default
eager loading), so every model is loaded in the dtype of its files, and only when the algorithm
asks for it (``_recursive_: false``, as in FusionBench's own modelpool configs). The algorithm is FusionBench's own class, built from
a ``_target_`` config exactly like its ``fusion_bench_config/method/*.yaml`` (anchors.py passes
the parameters: FusionBench's shipped defaults, except WUDI's step count and RegMean's row count,
see anchors.py). RegMean reads its images from files (``file_regmean``); MagMax, WUDI and RegMean
run on a float32 pool (``--dtype``) and are cast back (``--out-dtype``). It runs on CPU; the merged
model is saved with ``save_pretrained`` (safetensors) in the dtype it came out in, which is logged.
Prints one JSON line last.

Offline: nothing is fetched from a hub (HF_HUB_OFFLINE=1 is set here too).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

if TYPE_CHECKING:
    from fusion_bench import BaseAlgorithm, BaseModelPool

LOG = logging.getLogger("fusionbench_merge")
# FusionBench's classes, as its method configs name them (fusion_bench_config/method/...)
ALGORITHMS = {
    "task_arithmetic": "fusion_bench.method.TaskArithmeticAlgorithm",  # task_arithmetic.yaml
    "ties": "fusion_bench.method.TiesMergingAlgorithm",  # ties_merging.yaml
    "dare": "fusion_bench.method.DareTaskArithmetic",  # dare/task_arithmetic.yaml
    "tsv_m": "fusion_bench.method.TaskSingularVectorMerging",  # task_singular_vector/TaskSingularVectorMerging.yaml
    "iso_c": "fusion_bench.method.ISO_C_Merge",  # isotropic_merging/iso_c.yaml
    "iso_cts": "fusion_bench.method.ISO_CTS_Merge",  # isotropic_merging/iso_cts.yaml
    "magmax": "fusion_bench.method.MagMaxAlgorithm",  # magmax/magmax.yaml
    "wudi": "fusion_bench.method.WUDIMerging",  # wudi/wudi.yaml
    "regmean": "fusion_bench.method.RegMeanAlgorithmForCLIP",  # regmean/clip_regmean.yaml (see file_regmean)
}


GRADIENT_METHODS = {"wudi"}  # optimise with autograd inside run() (FusionBench calls them outside no_grad too)


def model_pool(kind: str, base: str, models: dict[str, str], dtype: str) -> BaseModelPool:
    """FusionBench's model pool over local directories, every model loaded in `dtype`."""
    from omegaconf import DictConfig

    from fusion_bench.utils import instantiate

    named = {"_pretrained_": base, **models}
    if kind == "clip_vision":
        entries = {name: {"_target_": "transformers.CLIPVisionModel.from_pretrained",
                          "pretrained_model_name_or_path": path, "torch_dtype": dtype}
                   for name, path in named.items()}
        config = {"_target_": "fusion_bench.modelpool.CLIPVisionModelPool", "models": entries}
    else:
        config = {"_target_": "fusion_bench.modelpool.CausalLMPool", "models": named, "tokenizer": base,
                  "model_kwargs": {"torch_dtype": dtype}}
    # as in FusionBench's modelpool configs: models are built when the algorithm asks for them,
    # not all at once while the pool itself is instantiated
    return instantiate(DictConfig({**config, "_recursive_": False}))


def algorithm(method: str, params: dict) -> BaseAlgorithm:
    """FusionBench's algorithm object for `method`, from a config like its method YAML."""
    from omegaconf import DictConfig

    from fusion_bench.utils import instantiate

    return instantiate(DictConfig({"_target_": ALGORITHMS[method], **params}))


def file_regmean(params: dict, pool: BaseModelPool, data: dict[str, str]) -> BaseAlgorithm:
    """FusionBench's RegMeanAlgorithmForCLIP, unchanged where it computes and merges: its forward hooks on every
    nn.Linear of the vision model, its running-mean Gram matrices, its merge rule. Only where the images come from
    differs: the pool's train split becomes the benchmark's data file per task (all rows in one batch, so the
    DataLoader's shuffle changes nothing), the images are already preprocessed (no CLIP processor), and the forward
    stops at the vision model (the zero-shot text head it would add feeds no hooked layer)."""
    from omegaconf import DictConfig
    from safetensors.torch import load_file

    from fusion_bench.method import RegMeanAlgorithmForCLIP

    class FileRegMean(RegMeanAlgorithmForCLIP):
        clip_processor = None

        def on_regmean_start(self):
            pass

        def compute_logits(self, module, batch, task):
            return module(batch[0])[1]

    rows = {name: load_file(path)["pixel_values"] for name, path in data.items()}
    pool.load_train_dataset = lambda name: [(x, 0) for x in rows[name]]
    batch = max(len(x) for x in rows.values())
    return FileRegMean(**params, dataloader_kwargs=DictConfig({"batch_size": batch, "num_workers": 0}))


def parse_pairs(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> dict, values read as YAML (numbers, booleans, lists)."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def merge(args: argparse.Namespace) -> dict:
    """Load, merge, save; returns what the caller logs next to its own timing."""
    from importlib.metadata import version

    t0 = time.perf_counter()
    models = {name: path for name, path in (m.split("=", 1) for m in args.model)}
    pool = model_pool(args.pool, args.base, models, args.dtype)
    params = parse_pairs(args.param)
    if args.method == "regmean":
        algo = file_regmean(params, pool, dict(d.split("=", 1) for d in args.data))
    else:
        algo = algorithm(args.method, params)
    t1 = time.perf_counter()
    merged = algo.run(pool)
    t2 = time.perf_counter()
    if args.out_dtype:  # computed in --dtype, written in the files' dtype like the other tools
        merged = merged.to(getattr(torch, args.out_dtype))
    out_dtype = str(next(merged.parameters()).dtype).removeprefix("torch.")
    merged.save_pretrained(args.out, safe_serialization=True)
    t3 = time.perf_counter()
    return {"tool": "fusionbench", "method": args.method, "algorithm": ALGORITHMS[args.method],
            "params": parse_pairs(args.param), "setup_s": t1 - t0, "run_s": t2 - t1, "save_s": t3 - t2,
            "out_dtype": out_dtype, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "versions": {p: version(p) for p in ("fusion-bench", "torch", "transformers")}}


def main() -> None:
    """Parse the flags, merge, print the result as the last stdout line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", choices=("clip_vision", "causal_lm"), required=True)
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), required=True,
                    help="torch_dtype every model is loaded in: the dtype of the files")
    ap.add_argument("--base", required=True)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--method", choices=sorted(ALGORITHMS), required=True)
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="algorithm parameter (FusionBench's names), repeat")
    ap.add_argument("--out", required=True)
    ap.add_argument("--out-dtype", choices=("float32", "float16", "bfloat16"), help="cast the merged model before saving")
    ap.add_argument("--data", action="append", default=[], metavar="NAME=FILE",
                    help="regmean: a task's unlabeled images (.safetensors with pixel_values), repeat")
    ap.add_argument("--seed", type=int, default=0, help="torch seed (DARE's random drop)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    torch.manual_seed(args.seed)
    with torch.set_grad_enabled(args.method in GRADIENT_METHODS):
        result = merge(args)
    LOG.info("merged with %s in %.1f s, saved %s in %.1f s", result["algorithm"], result["run_s"],
             result["out_dtype"], result["save_s"])
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
