"""The token-level value model in the published `VGS-AI/DeepSeek-VM-1.5B` layout.

Layout (parameter names are the checkpoint's): a `Qwen2Model` backbone under `model.*` and a
bias-free head `score = Sequential(Linear(H, H), ReLU, Linear(H, num_labels))`, i.e.
`score.0.weight` and `score.2.weight`. With 3 labels the classes are 0 = finished incorrect,
1 = finished correct, 2 = unfinished; the value of a prefix is softmax(logits)[1] at its last
token, in fp32. With 1 label (Bradley-Terry / BCE models) the value is sigmoid(logit).

The config is a plain `Qwen2Config` (`model_type: qwen2`, `architectures:
["Qwen2ForClassifier"]`, `num_labels`), so checkpoints written by plain transformers code
load here and ours load there.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config
from transformers.modeling_outputs import ModelOutput
from transformers.models.auto.auto_factory import _BaseAutoModelClass, _LazyAutoMapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2PreTrainedModel

ARCHITECTURE = "Qwen2ForClassifier"
SUCCESS_CLASS = 1
LABEL_NAMES = {0: "incorrect", 1: "correct", 2: "unfinished"}


@dataclass
class ValueModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # fp32, [batch, positions, num_labels]
    past_key_values: Any = None


def success_probs(logits: torch.Tensor) -> torch.Tensor:
    """P(finished correct) from head logits: softmax[..., 1] for 3 classes, sigmoid for 1."""
    logits = logits.float()
    if logits.shape[-1] == 1:
        return torch.sigmoid(logits[..., 0])
    return torch.softmax(logits, dim=-1)[..., SUCCESS_CLASS]


def token_level_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every masked position against its sequence's outcome class.

    Per-sequence mean over masked tokens, then mean over the batch; a sequence with an empty
    mask contributes 0 (as in the published trainer). `labels` is [batch] (int classes);
    with a 1-label head it is BCE against (label == 1).
    """
    b, t, c = logits.shape
    mask = loss_mask.to(logits.dtype)
    if c == 1:
        target = (labels == SUCCESS_CLASS).to(logits.dtype)[:, None].expand(b, t)
        per_tok = F.binary_cross_entropy_with_logits(logits[..., 0], target, reduction="none")
    else:
        target = labels.long()[:, None].expand(b, t)
        per_tok = F.cross_entropy(logits.reshape(b * t, c), target.reshape(b * t), reduction="none").view(b, t)
    per_seq = (per_tok * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return per_seq.mean()


class Qwen2ForClassifier(Qwen2PreTrainedModel):
    """Qwen2 backbone + bias-free Linear-ReLU-Linear head applied per token."""

    def __init__(self, config: Qwen2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = Qwen2Model(config)
        h = config.hidden_size
        self.score = nn.Sequential(
            nn.Linear(h, h, bias=False), nn.ReLU(), nn.Linear(h, self.num_labels, bias=False)
        )
        # Dropout on the head input during training (published: 0.05, same as attention dropout).
        self.head_dropout = float(getattr(config, "head_dropout", 0.0) or 0.0)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        loss_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> ValueModelOutput:
        """Per-token logits (fp32). With `labels` and `loss_mask`, also the token-level loss.
        `logits_to_keep=k` applies the head to the last k positions only (inference)."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        if self.training and self.head_dropout > 0:
            hidden = F.dropout(hidden, p=self.head_dropout)
        logits = self.score(hidden).float()
        loss = None
        if labels is not None:
            if loss_mask is None:
                loss_mask = attention_mask if attention_mask is not None else torch.ones(logits.shape[:2], device=logits.device)
            loss = token_level_loss(logits, labels, loss_mask)
        return ValueModelOutput(loss=loss, logits=logits, past_key_values=out.past_key_values if use_cache else None)

    @torch.no_grad()
    def predict_values(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Success probability at the last real token of each right-padded row: [batch] fp32."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state
        if attention_mask is None:
            last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
        else:
            last = attention_mask.long().sum(1) - 1
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return success_probs(self.score(h_last).float())


class AutoValueModel(_BaseAutoModelClass):
    """`AutoModel` for token-level value models: `AutoConfig` gives the checkpoint's plain
    `Qwen2Config`, and this maps it to `Qwen2ForClassifier`.

    A separate Auto class rather than an entry in `AutoModelForTokenClassification`: the
    config class is transformers' own, so registering there would silently replace
    `Qwen2ForTokenClassification` for every Qwen2 checkpoint in the process.
    """

    _model_mapping = _LazyAutoMapping(CONFIG_MAPPING_NAMES, OrderedDict())


AutoValueModel.register(Qwen2Config, Qwen2ForClassifier, exist_ok=True)


def value_model_config(**kwargs: Any) -> Qwen2Config:
    """A `Qwen2Config` carrying the published architecture name and label set."""
    num_labels = int(kwargs.pop("num_labels", 3))
    cfg = Qwen2Config(**kwargs)
    cfg.num_labels = num_labels
    if num_labels == 3:
        cfg.id2label = dict(LABEL_NAMES)
        cfg.label2id = {v: k for k, v in LABEL_NAMES.items()}
    cfg.architectures = [ARCHITECTURE]
    return cfg


def is_value_checkpoint(path: str) -> bool:
    """True when `path` holds a config naming the value-model architecture."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return False
    with open(cfg_path) as f:
        return ARCHITECTURE in (json.load(f).get("architectures") or [])


def load_value_model(path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Qwen2ForClassifier:
    """Load a value model from a local checkpoint or a Hub id (e.g. `VGS-AI/DeepSeek-VM-1.5B`).

    Default dtype: bf16 on GPU, fp32 on CPU.
    """
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    # The class itself, not AutoValueModel: `from_pretrained` reads the plain Qwen2Config either
    # way, and this avoids transformers' private auto-mapping API (5.17 maps nothing through it).
    model = Qwen2ForClassifier.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()
