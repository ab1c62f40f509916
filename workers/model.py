"""The fine-tuned model: a frozen encoder, LoRA on its attention, and a shared scoring
head. A multiple-choice example is scored as (prompt, option) pairs; the option with the
highest score wins. Every client's task goes through the same head, so all clients share
one parameter space and their task vectors can be compared.

One `ModelRuntime` per process: the base model is loaded once, and each task swaps in
the client's adapter weights (LoRA + head) with `set_peft_model_state_dict`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import (
    LoraConfig,
    PeftModel,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from aggregator.task_vectors import StateDict
from services.client_data import Example
from services.settings import Settings

log = logging.getLogger(__name__)


def lora_config(settings: Settings) -> LoraConfig:
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        task_type=TaskType.SEQ_CLS,  # makes the scoring head ("classifier") trainable and saved
        base_model_name_or_path=settings.model_path,
    )


def load_base_model(model_path: str, dropout: float | None = None) -> Any:
    """The frozen base model with a one-score head. `dropout` (if given) replaces the
    base model's own dropout rates."""
    hf_logging.disable_progress_bar()  # a bar per load is noise in worker logs
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    model.config.problem_type = "regression"  # one score per (prompt, option) pair
    if dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
    return model


def initial_adapter(peft_state: StateDict, seed: int) -> StateDict:
    """The adapter every client starts from, the same on every worker and device:
    LoRA A Kaiming-uniform and B zero (as peft does), the head N(0, 0.02) and bias 0,
    drawn from one seeded generator on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    out: StateDict = {}
    for key in sorted(peft_state):
        t = torch.empty(peft_state[key].shape, dtype=torch.float32)
        if ".lora_A." in key:
            torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
        elif ".lora_B." in key or key.endswith(".bias"):
            torch.nn.init.zeros_(t)
        else:
            torch.nn.init.normal_(t, std=0.02, generator=gen)
        out[key] = t
    return out


@dataclass
class TrainResult:
    adapter: StateDict
    steps: int
    loss: float
    samples: int
    duration_s: float


class ModelRuntime:
    """The base model of this process with a LoRA adapter slot."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = torch.device(settings.device)
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        t0 = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
        # Base-model dropout off by default: in short local runs its noise swamps the task
        # vector (measured on the demo data: cosine of two same-task clients 0.01 with
        # BERT's 0.1 dropout, 0.5 without), and similarity is what fedvec aggregates by.
        base = load_base_model(
            settings.model_path, None if settings.base_dropout < 0 else settings.base_dropout
        )
        self.model: PeftModel = get_peft_model(base, lora_config(settings))
        self.model.to(self.device)
        self.keys = sorted(get_peft_model_state_dict(self.model))
        log.info(
            "loaded %s with LoRA r=%d on %s in %.1fs (%d trainable parameters)",
            settings.model_path,
            settings.lora_r,
            settings.target_modules,
            time.perf_counter() - t0,
            self.num_trainable(),
        )

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def initial_adapter(self) -> StateDict:
        return initial_adapter(self.adapter_state(), self.settings.lora_init_seed)

    def adapter_state(self) -> StateDict:
        return {
            k: v.detach().to("cpu", torch.float32).clone()
            for k, v in get_peft_model_state_dict(self.model).items()
        }

    def load_adapter(self, state: StateDict) -> None:
        missing = set(self.keys) - set(state)
        if missing:
            raise ValueError(f"adapter lacks {len(missing)} keys, e.g. {sorted(missing)[0]}")
        state = {k: v.to(self.device) for k, v in state.items()}
        result = set_peft_model_state_dict(self.model, state)
        if result.unexpected_keys:
            raise ValueError(f"adapter has unexpected keys {result.unexpected_keys[:3]}")

    # --- scoring ----------------------------------------------------------------------
    def _pair_scores(self, examples: Sequence[Example]) -> list[torch.Tensor]:
        prompts = [ex.prompt for ex in examples for _ in ex.options]
        options = [opt for ex in examples for opt in ex.options]
        enc = self.tokenizer(
            prompts,
            options,
            truncation="only_first",
            max_length=self.settings.max_length,
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        scores = self.model(**enc).logits.squeeze(-1).float()
        return list(torch.split(scores, [len(ex.options) for ex in examples]))

    def loss(self, examples: Sequence[Example]) -> torch.Tensor:
        losses = [
            torch.nn.functional.cross_entropy(
                s.unsqueeze(0), torch.tensor([ex.label], device=s.device)
            )
            for s, ex in zip(self._pair_scores(examples), examples, strict=True)
        ]
        return torch.stack(losses).mean()

    @torch.no_grad()
    def predict(self, examples: Sequence[Example]) -> list[torch.Tensor]:
        """Per example, the option scores (CPU float32)."""
        self.model.eval()
        out: list[torch.Tensor] = []
        bs = self.settings.eval_batch_size
        for i in range(0, len(examples), bs):
            out.extend(s.cpu() for s in self._pair_scores(examples[i : i + bs]))
        return out

    def evaluate(self, examples: Sequence[Example]) -> tuple[float, float]:
        """(accuracy, mean cross-entropy)."""
        scores = self.predict(examples)
        correct = sum(int(s.argmax()) == ex.label for s, ex in zip(scores, examples, strict=True))
        loss = sum(
            float(torch.nn.functional.cross_entropy(s.unsqueeze(0), torch.tensor([ex.label])))
            for s, ex in zip(scores, examples, strict=True)
        )
        return correct / max(len(examples), 1), loss / max(len(examples), 1)

    # --- training ---------------------------------------------------------------------
    def planned_steps(self, num_examples: int) -> int:
        s = self.settings
        steps = s.epochs * math.ceil(num_examples / s.batch_size)
        return min(steps, s.max_steps) if s.max_steps > 0 else steps

    def train(
        self,
        start: StateDict,
        examples: Sequence[Example],
        *,
        seed: int,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> TrainResult:
        """Fine-tune from `start` on `examples`; returns the trained adapter."""
        s = self.settings
        torch.manual_seed(seed)
        rng = random.Random(seed)
        self.load_adapter(start)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0)
        total = self.planned_steps(len(examples))
        t0 = time.perf_counter()
        step, samples, loss_sum, last_loss = 0, 0, 0.0, float("nan")
        while step < total:
            order = list(range(len(examples)))
            rng.shuffle(order)
            for i in range(0, len(order), s.batch_size):
                if step >= total:
                    break
                batch = [examples[j] for j in order[i : i + s.batch_size]]
                loss = self.loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                samples += len(batch)
                last_loss = float(loss.detach())
                loss_sum += last_loss
                if progress is not None:
                    progress(step, total, last_loss)
        self.model.eval()
        return TrainResult(
            adapter=self.adapter_state(),
            steps=step,
            loss=loss_sum / max(step, 1),
            samples=samples,
            duration_s=time.perf_counter() - t0,
        )


_RUNTIMES: dict[tuple[Any, ...], ModelRuntime] = {}


def get_runtime(settings: Settings) -> ModelRuntime:
    """The process's runtime: the model is loaded on first use, then reused by every task."""
    key = (
        settings.model_path,
        settings.device,
        settings.lora_r,
        settings.lora_alpha,
        settings.lora_dropout,
        settings.lora_target_modules,
        settings.base_dropout,
    )
    if key not in _RUNTIMES:
        _RUNTIMES[key] = ModelRuntime(settings)
    runtime = _RUNTIMES[key]
    runtime.settings = settings
    return runtime
