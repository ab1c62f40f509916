"""The encoder's scoring model: one score per (prompt, option) pair.

The frozen encoder reads the pair, its last hidden state is mean-pooled over the real
(non-padding) tokens, and one shared linear unit turns that into a score. Mean pooling,
not BERT's [CLS] pooler: the sentence-transformer MiniLM was trained for mean-pooled
embeddings, and its pooler weights are untrained. Measured on flan8 (trec, 240 records,
2 epochs), this formulation with LoRA on every linear layer reaches .745 test accuracy
where the [CLS] head collapsed to one answer per task.

A plain nn.Module, so peft wraps it as a generic model: LoRA on the encoder's linear
layers, the head ("classifier") trained and saved whole (modules_to_save). An exported
adapter loads with
`PeftModel.from_pretrained(workers.model.load_base_model(model_path), folder)`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch


class PairScorer(torch.nn.Module):
    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # peft reads the wrapped model's config
        self.name_or_path = encoder.config.name_or_path  # and its path, for adapter_config
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, 1)
        torch.nn.init.normal_(self.classifier.weight, std=0.02)
        torch.nn.init.zeros_(self.classifier.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        **_: Any,
    ) -> SimpleNamespace:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return SimpleNamespace(logits=self.classifier(pooled.to(self.classifier.weight.dtype)))
