"""The published value-model layout as a vLLM pooling model.

vLLM's stock `Qwen2ForRewardModel` has the same `model.*` / `score.0` / `score.2` names but
forces `num_labels = 1`, gives its head linear layers a bias and applies the head to every
token. A VGS checkpoint (bias-free head, 3 labels, value read at the last token) therefore
needs its own class. This one:

- runs the `Qwen2Model` trunk and returns hidden states (no head inside `forward`), so the
  `classify` task applies the head to the LAST token only, in the fp32 head dtype vLLM uses
  for pooling models;
- pools with LAST, which keeps vLLM's prefix caching on for this causal model: scoring
  prefix + block recomputes only the block;
- forces the activation to softmax (3 labels) / sigmoid (1 label) whatever `problem_type`
  the checkpoint's config carries, because the value is defined that way;
- also supports `token_classify` (per-token probabilities, e.g. for debugging a trace),
  which vLLM serves without prefix-cache reads.

It is registered under the architecture name `Qwen2ForClassifier` by
`vgs.vllm_plugin.register` (a `vllm.general_plugins` entry point, so spawned
workers see it too).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.pooler import DispatchPooler
from vllm.model_executor.layers.pooler.activations import PoolerClassify
from vllm.model_executor.layers.pooler.seqwise.poolers import pooler_for_classify
from vllm.model_executor.layers.pooler.tokwise.poolers import pooler_for_token_classify
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.interfaces_base import default_pooling_type
from vllm.model_executor.models.qwen2 import Qwen2Model
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.sequence import IntermediateTensors

SUPPORTED_NUM_LABELS = (1, 3)


@default_pooling_type(seq_pooling_type="LAST", tok_pooling_type="ALL")
class Qwen2ForClassifierPooling(nn.Module, SupportsPP):
    """Qwen2 trunk + bias-free Linear-ReLU-Linear head (`score.0`, `score.2`)."""

    is_pooling_model = True

    hf_to_vllm_mapper = Qwen2Model.hf_to_vllm_mapper
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        model_config = vllm_config.model_config
        config = model_config.hf_config
        num_labels = int(getattr(config, "num_labels", 3))
        if num_labels not in SUPPORTED_NUM_LABELS:
            raise ValueError(
                f"Qwen2ForClassifier supports num_labels in {SUPPORTED_NUM_LABELS}, got {num_labels}")
        self.config = config
        self.num_labels = num_labels
        quant_config = vllm_config.quant_config
        head_dtype = model_config.head_dtype

        self.model = Qwen2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        h = config.hidden_size
        # Column- then row-parallel: ReLU is elementwise, so the sharded hidden layer needs
        # no gather between the two (same split as vLLM's Qwen2 reward model).
        self.score = nn.Sequential(
            ColumnParallelLinear(h, h, bias=False, quant_config=quant_config, params_dtype=head_dtype,
                                 return_bias=False, prefix=maybe_prefix(prefix, "score.0")),
            nn.ReLU(),
            RowParallelLinear(h, num_labels, bias=False, quant_config=quant_config, params_dtype=head_dtype,
                              return_bias=False, prefix=maybe_prefix(prefix, "score.2")),
        )
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

        pooler_config = model_config.pooler_config
        assert pooler_config is not None, "vLLM sets a pooler config for runner='pooling'"
        act = PoolerClassify(num_labels=num_labels)  # softmax for 3 labels, sigmoid for 1
        self.pooler = DispatchPooler({
            "classify": pooler_for_classify(pooler_config, classifier=self.score, act_fn=act),
            "token_classify": pooler_for_token_classify(pooler_config, classifier=self.score, act_fn=act),
        })

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """Hidden states of every scheduled token; the pooler picks the last and applies the head."""
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The trunk's own `load_weights` maps q/k/v and gate/up onto vLLM's fused layers.
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=["lm_head."])
        return loader.load_weights(weights)
