"""PNG plots of what AdaRank learned (matplotlib, Agg backend: no display needed).

1. Mask heatmaps: for the first, middle and last repeated block, one task × component panel per spectral tensor —
   which singular components each task kept (components in descending singular-value order within each task's block).
2. Learned rank vs intrinsic rank: per task, the components AdaRank kept in each spectral tensor next to the 95%-energy
   rank of that task's own task vector — the paper's observation is that the learned ranks differ from any fixed rule.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from rankmerge.service.bench.spectra import block_of  # noqa: E402

log = logging.getLogger(__name__)

MASK_COLORS = ListedColormap(["#e8e8e8", "#1f4e9c"])  # off, on; components a row does not have stay white
MAX_LABELLED_TICKS = 30


def short_name(key: str) -> str:
    """The tensor's name inside its block, without the trailing `.weight` (panel titles and ticks)."""
    block = block_of(key)
    tail = key.split(f".{block}.", 1)[1] if block is not None else key
    return tail.removesuffix(".weight")


def chosen_blocks(keys: list[str]) -> list[int]:
    """First, middle and last block number present among the keys (fewer when the model has fewer blocks)."""
    blocks = sorted({b for b in map(block_of, keys) if b is not None})
    if not blocks:
        return []
    return sorted({blocks[0], blocks[len(blocks) // 2], blocks[-1]})


def mask_rows(mask: np.ndarray, owners: np.ndarray, num_tasks: int) -> np.ndarray:
    """Rows = tasks (then the shared row T when a component has it), columns = components in order; NaN pads short rows."""
    groups = [owners == t for t in range(num_tasks)]
    if (owners == num_tasks).any():
        groups.append(owners == num_tasks)
    width = max(int(g.sum()) for g in groups)
    rows = np.full((len(groups), width), np.nan)
    for i, group in enumerate(groups):
        rows[i, : int(group.sum())] = mask[group]
    return rows


def plot_masks(adaptive: Path, tasks: list[str], out: Path, title: str) -> Path:
    """Task × component heatmaps of the hard masks for the first, middle and last spectral block.

    `adaptive`: an output's adaptive/ folder (masks and the λ row owning each mask entry, as the job exported them).
    """
    masks = {k: v.numpy().astype(float) for k, v in load_file(str(adaptive / "masks.safetensors")).items() if v.ndim == 1 and v.numel() > 0}
    owners_of = load_file(str(adaptive / "owners.safetensors"))
    blocks = chosen_blocks(list(masks))
    per_block = {b: [k for k in masks if block_of(k) == b] for b in blocks}
    columns = max((len(keys) for keys in per_block.values()), default=1)
    fig, axes = plt.subplots(len(blocks) or 1, columns, figsize=(2.6 * columns + 1, 0.35 * (len(tasks) + 1) * len(blocks) + 2.2),
                             squeeze=False, constrained_layout=True)
    for row, block in enumerate(blocks):
        for col in range(columns):
            ax = axes[row][col]
            if col >= len(per_block[block]):
                ax.axis("off")
                continue
            key = per_block[block][col]
            owners = owners_of[key].numpy()
            rows = mask_rows(masks[key], owners, len(tasks))
            ax.imshow(np.ma.masked_invalid(rows), aspect="auto", interpolation="nearest", cmap=MASK_COLORS, vmin=0, vmax=1)
            labels = tasks + (["shared"] if rows.shape[0] > len(tasks) else [])
            ax.set_yticks(range(len(labels)), labels if col == 0 else [""] * len(labels), fontsize=7)
            ax.set_title(f"block {block}: {short_name(key)}\nkept {int(np.nansum(rows))}/{int(np.isfinite(rows).sum())}", fontsize=8)
            ax.tick_params(axis="x", labelsize=6)
            if row == len(blocks) - 1:
                ax.set_xlabel("component (by singular value)", fontsize=7)
    fig.suptitle(f"{title}: learned masks (blue = kept)", fontsize=10)
    return _save(fig, out)


def plot_ranks(learned: dict[str, dict[str, list[int]]], intrinsic: dict[str, list[int]], tasks: list[str], out: Path,
               energy: float = 0.95) -> Path:
    """Per task: learned rank of each AdaRank run and the task vector's intrinsic rank, over the spectral tensors."""
    keys = list(intrinsic)
    x = np.arange(len(keys))
    columns = min(len(tasks), 4)
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows + 0.6), squeeze=False, sharey=True,
                             constrained_layout=True)
    for t, task in enumerate(tasks):
        ax = axes[t // columns][t % columns]
        ax.plot(x, [intrinsic[k][t] for k in keys], "k-o", markersize=3, linewidth=1.5, label=f"intrinsic ({energy:.0%} energy)")
        for label, ranks in learned.items():
            ax.plot(x, [ranks[k][t] if k in ranks else np.nan for k in keys], "-s", markersize=2.5, linewidth=1, label=label)
        ax.set_title(task, fontsize=9)
        _tensor_ticks(ax, keys)
        if t % columns == 0:
            ax.set_ylabel("rank (components)", fontsize=8)
    for extra in range(len(tasks), rows * columns):
        axes[extra // columns][extra % columns].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("learned rank (AdaRank, final step) vs intrinsic rank of each task vector", fontsize=10)
    return _save(fig, out)


def _tensor_ticks(ax, keys: list[str]) -> None:
    """Every tensor labelled when few; otherwise one tick per block."""
    if len(keys) <= MAX_LABELLED_TICKS:
        ax.set_xticks(range(len(keys)), [f"{block_of(k)}:{short_name(k)}" for k in keys], rotation=90, fontsize=6)
        return
    starts = [i for i, k in enumerate(keys) if i == 0 or block_of(k) != block_of(keys[i - 1])]
    ax.set_xticks(starts, [str(block_of(keys[i])) for i in starts], fontsize=6)
    ax.set_xlabel("block", fontsize=7)


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    log.info("wrote %s", out)
    return out
