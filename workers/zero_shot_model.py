"""The zero-shot task model: a CLIP image encoder whose head is the pretrained visual projection and the class
embeddings (workers/zero_shot.py computes them). Apart from zero_shot.py so that reading a job spec never imports
transformers' model classes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.modeling_outputs import ImageClassifierOutput


def zero_shot_logits(image_embeds: Tensor, weight: Tensor) -> Tensor:
    """Projected image features [B, D] and the head's weight [C, D] (class embeddings × exp(logit_scale)) -> logits."""
    return (image_embeds / image_embeds.norm(dim=-1, keepdim=True)) @ weight.t()


class ZeroShotHead(nn.Module):
    """The pretrained visual projection and the class embeddings scaled by exp(logit_scale)."""

    def __init__(self, hidden_size: int, projection_dim: int, num_labels: int) -> None:
        super().__init__()
        self.visual_projection = nn.Linear(hidden_size, projection_dim, bias=False)
        self.weight = nn.Parameter(torch.zeros(num_labels, projection_dim))

    def forward(self, pooled: Tensor) -> Tensor:
        return zero_shot_logits(self.visual_projection(pooled), self.weight)


class CLIPZeroShotClassifier(CLIPVisionModel):
    """A CLIP image encoder with a zero-shot head: a transformers model (save_pretrained / from_pretrained work), whose
    checkpoint is the encoder's plus `classifier.*`."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__(config)
        self.classifier = ZeroShotHead(config.hidden_size, config.projection_dim, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: Tensor | None = None, interpolate_pos_encoding: bool = False,
                labels: Tensor | None = None, **kwargs: Any) -> ImageClassifierOutput:
        encoded = super().forward(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        logits = self.classifier(encoded.pooler_output)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


MODEL_CLASSES: dict[str, type[CLIPVisionModel]] = {"CLIPZeroShotClassifier": CLIPZeroShotClassifier}
