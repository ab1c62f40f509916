"""The fine-tuned model: a frozen base model with LoRA, in one of two kinds.

- ``encoder`` (CPU, tests, demo): a frozen encoder, LoRA on its attention and a shared
  scoring head. A multiple-choice example is scored as (prompt, option) pairs; the option
  with the highest score wins. Every client's task goes through the same head, so all
  clients share one parameter space and their task vectors can be compared.
- ``causal-lm`` (GPU, the paper's setting): any Hugging Face causal LM with LoRA. Trained
  on the token NLL of the answer given the prompt (as FedIT/FedDPA do); an option is
  scored by the summed log-likelihood of its tokens, and a generation task by ROUGE-L of
  greedy output.

One runtime per process (`get_runtime`): the base model is loaded once, and each task
swaps in the client's adapter weights with `set_peft_model_state_dict`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from peft import (
    LoraConfig,
    PeftModel,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from aggregator.task_vectors import StateDict
from services.client_data import GENERATION, Example, task_kind
from services.settings import Settings
from workers.pair_scorer import PairScorer
from workers.text_metrics import balanced_accuracy, rouge_l

log = logging.getLogger(__name__)

ENCODER = "encoder"
CAUSAL_LM = "causal-lm"
MODEL_KINDS = (ENCODER, CAUSAL_LM)
PRECISIONS = ("fp32", "bf16", "auto")


def model_kind(settings: Settings) -> str:
    if settings.model_kind not in MODEL_KINDS:
        raise ValueError(
            f"setting FEDVEC_MODEL_KIND={settings.model_kind!r} is not one of {MODEL_KINDS}"
        )
    return settings.model_kind


def resolve_precision(settings: Settings) -> torch.dtype:
    """The dtype of the frozen base model. "auto" is bf16 on a CUDA device that supports
    it, else fp32; "bf16" is honoured on any device (on the CPU it is slow but works)."""
    if settings.precision not in PRECISIONS:
        raise ValueError(
            f"setting FEDVEC_PRECISION={settings.precision!r} is not one of {PRECISIONS}"
        )
    if settings.precision == "bf16":
        return torch.bfloat16
    if settings.precision == "auto":
        device = torch.device(settings.device)
        if (
            device.type == "cuda"
            and torch.cuda.is_available()
            and torch.cuda.is_bf16_supported(including_emulation=False)
        ):
            return torch.bfloat16
    return torch.float32


def lora_config(settings: Settings) -> LoraConfig:
    if model_kind(settings) == ENCODER:
        # a generic peft model over PairScorer: its scoring head trained and saved whole
        task, saved = None, ["classifier"]
    else:
        task, saved = TaskType.CAUSAL_LM, None
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        task_type=task,
        modules_to_save=saved,
        base_model_name_or_path=settings.model_path,
    )


def metric_name(examples: Sequence[Example]) -> str:
    """What `evaluate` scores these examples by: "rouge_l" for a generation task, else
    "accuracy" (also for no examples)."""
    if examples and task_kind(examples) == GENERATION:
        return "rouge_l"
    return "accuracy"


def _set_dropout(model: torch.nn.Module, dropout: float | None) -> None:
    if dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)


def load_base_model(
    model_path: str, dropout: float | None = None, dtype: torch.dtype = torch.float32
) -> PairScorer:
    """The frozen encoder (without BERT's pooler, which mean pooling leaves unused) under a
    fresh one-score head. `dropout` (if given) replaces the encoder's own dropout rates."""
    hf_logging.disable_progress_bar()  # a bar per load is noise in worker logs
    with _quiet_transformers():
        encoder = AutoModel.from_pretrained(model_path, dtype=dtype, add_pooling_layer=False)
    _set_dropout(encoder, dropout)
    return PairScorer(encoder)


def load_causal_lm(
    model_path: str, dropout: float | None = None, dtype: torch.dtype = torch.float32
) -> Any:
    """The frozen causal LM. `dropout` (if given) replaces its nn.Dropout rates."""
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    _set_dropout(model, dropout)
    return model


def training_seed(settings: Settings, client_id: int, version: int) -> int:
    """The seed of a client's update trained from its personalized version `version`: fixed by
    the run's seed, the client and the version, so a redelivered task trains the same bytes
    and a benchmark can replay exactly what the worker did."""
    return settings.seed * 1_000_003 + client_id * 1009 + version


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


class Scores(NamedTuple):
    """What `evaluate` measures: accuracy or ROUGE-L F1 (see `metric_name`), the mean loss,
    and for multiple choice the balanced accuracy (mean recall over the gold answers;
    None for generation)."""

    score: float
    loss: float
    balanced_accuracy: float | None = None


@dataclass
class TrainResult:
    adapter: StateDict
    steps: int
    loss: float
    samples: int
    duration_s: float
    tokens: int = 0  # non-padding input tokens of every training batch (throughput metrics)


def _to_float32_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # A float32 head after a bf16 base: cast its input up instead of the weights down.
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


class ModelRuntime:
    """The base model of this process with a LoRA adapter slot.

    `ModelRuntime(settings)` builds the runtime of `settings.model_kind`
    (`EncoderRuntime` or `CausalLMRuntime`); both share this interface.
    """

    def __new__(cls, settings: Settings) -> ModelRuntime:
        if cls is ModelRuntime:
            cls = CausalLMRuntime if model_kind(settings) == CAUSAL_LM else EncoderRuntime
        return super().__new__(cls)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = torch.device(settings.device)
        self.dtype = resolve_precision(settings)
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        t0 = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
        # Base-model dropout off by default: in short local runs its noise swamps the task
        # vector (measured on the demo data: cosine of two same-task clients 0.01 with
        # BERT's 0.1 dropout, 0.5 without), and similarity is what fedvec aggregates by.
        dropout = None if settings.base_dropout < 0 else settings.base_dropout
        base = self._load_base(dropout)
        if settings.gradient_checkpointing:
            # This also makes the frozen embeddings' output require grad, which the
            # checkpointed layers need for the LoRA weights inside them to get gradients.
            enable = getattr(base, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # transformers before the rename
                base.gradient_checkpointing_enable({"use_reentrant": False})
                base.enable_input_require_grads()
        with warnings.catch_warnings():  # peft 0.21 asks transformers a deprecated question
            warnings.simplefilter("ignore", FutureWarning)
            self.model: PeftModel = get_peft_model(
                base, lora_config(settings), autocast_adapter_dtype=True
            )
        # Trainable weights stay float32 whatever the base precision: small updates to
        # bf16 weights round away. peft does this for LoRA; the encoder's head needs it too.
        for module in self.model.modules():
            params = list(module.parameters(recurse=False))
            if any(p.requires_grad and p.dtype != torch.float32 for p in params):
                for p in params:
                    p.data = p.data.float()
                module.register_forward_pre_hook(_to_float32_input)
        self.model.to(self.device)
        self.model.eval()
        self.keys = sorted(get_peft_model_state_dict(self.model))
        # Non-padding input tokens of the last forward pass (set by each kind's forward,
        # from the CPU attention mask before it moves: counting costs no device sync).
        self.last_tokens = 0
        log.info(
            "loaded %s (%s, %s on %s) with LoRA r=%d on %s in %.1fs (%d trainable parameters)",
            settings.model_path,
            settings.model_kind,
            str(self.dtype).removeprefix("torch."),
            self.device,
            settings.lora_r,
            settings.target_modules,
            time.perf_counter() - t0,
            self.num_trainable(),
        )

    def _load_base(self, dropout: float | None) -> Any:
        raise NotImplementedError

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def initial_adapter(self) -> StateDict:
        return initial_adapter(self.adapter_state(), self.settings.lora_init_seed)

    def adapter_state(self) -> StateDict:
        """The adapter weights, always CPU float32 (what is stored and compared)."""
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

    @torch.no_grad()
    def effective_weights(self, state: StateDict) -> torch.Tensor:
        """The model's raw parameters where fine-tuning acts, flattened: W0 + scale·B·A of
        every LoRA module, plus the other trainable weights (the encoder's head). What a
        raw-parameter similarity (FedAMP-style) of two clients' models compares."""
        self.load_adapter(state)
        parts = [
            (m.base_layer.weight + m.get_delta_weight("default")).detach().float().flatten().cpu()
            for m in self.model.modules()
            if isinstance(m, LoraLayer)
        ]
        parts += [v.flatten() for k, v in sorted(state.items()) if "lora_" not in k]
        return torch.cat(parts)

    def release_memory(self) -> None:
        """Give back what a train/evaluate call left (a GPU worker lives for many tasks)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- per kind -----------------------------------------------------------------------
    def check_examples(self, examples: Sequence[Example]) -> None:
        """Raise ValueError for examples this runtime cannot train or evaluate on."""

    def loss(self, examples: Sequence[Example]) -> torch.Tensor:
        raise NotImplementedError

    def _evaluate(self, examples: Sequence[Example]) -> Scores:
        raise NotImplementedError

    def evaluate(self, examples: Sequence[Example]) -> Scores:
        """Scores of the loaded adapter on `examples`."""
        self.check_examples(examples)
        if not examples:
            return Scores(0.0, 0.0)
        try:
            return self._evaluate(examples)
        finally:
            self.release_memory()

    # --- training ---------------------------------------------------------------------
    def planned_steps(self, num_examples: int) -> int:
        s = self.settings
        steps = max(s.epochs * math.ceil(num_examples / s.batch_size), s.min_steps)
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
        self.check_examples(examples)
        try:
            return self._train(start, examples, seed=seed, progress=progress)
        finally:
            self.model.eval()
            self.release_memory()

    def _train(
        self,
        start: StateDict,
        examples: Sequence[Example],
        *,
        seed: int,
        progress: Callable[[int, int, float], None] | None,
    ) -> TrainResult:
        s = self.settings
        torch.manual_seed(seed)
        rng = random.Random(seed)
        self.load_adapter(start)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0)
        total = self.planned_steps(len(examples))
        t0 = time.perf_counter()
        step, samples, tokens, loss_sum, last_loss = 0, 0, 0, 0.0, float("nan")
        while step < total:
            order = list(range(len(examples)))
            rng.shuffle(order)
            for i in range(0, len(order), s.batch_size):
                if step >= total:
                    break
                batch = [examples[j] for j in order[i : i + s.batch_size]]
                loss = self.loss(batch)
                tokens += self.last_tokens
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                samples += len(batch)
                last_loss = float(loss.detach())
                loss_sum += last_loss
                if progress is not None:
                    progress(step, total, last_loss)
        del opt  # its state is twice the adapter's size; train() then collects it
        return TrainResult(
            adapter=self.adapter_state(),
            steps=step,
            loss=loss_sum / max(step, 1),
            samples=samples,
            duration_s=time.perf_counter() - t0,
            tokens=tokens,
        )


class EncoderRuntime(ModelRuntime):
    """Encoder + scoring head: multiple-choice only."""

    def _load_base(self, dropout: float | None) -> Any:
        return load_base_model(self.settings.model_path, dropout, self.dtype)

    def check_examples(self, examples: Sequence[Example]) -> None:
        for ex in examples:
            if ex.is_generation:
                raise ValueError(
                    "the encoder model scores options and cannot generate text: "
                    "generation tasks need FEDVEC_MODEL_KIND=causal-lm"
                )

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
        )
        self.last_tokens = int(enc["attention_mask"].sum())
        enc = enc.to(self.device)
        scores = self.model(**enc).logits.squeeze(-1).float()
        return list(torch.split(scores, [len(ex.options) for ex in examples]))

    def loss(self, examples: Sequence[Example]) -> torch.Tensor:
        self.check_examples(examples)
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
        self.check_examples(examples)
        self.model.eval()
        out: list[torch.Tensor] = []
        bs = self.settings.eval_batch_size
        for i in range(0, len(examples), bs):
            out.extend(s.cpu() for s in self._pair_scores(examples[i : i + bs]))
        return out

    def _evaluate(self, examples: Sequence[Example]) -> Scores:
        """Accuracy, mean cross-entropy over the options, balanced accuracy."""
        scores = self.predict(examples)
        loss = sum(
            float(torch.nn.functional.cross_entropy(s.unsqueeze(0), torch.tensor([ex.label])))
            for s, ex in zip(scores, examples, strict=True)
        )
        return _choice_scores(scores, examples, loss / len(examples))


def _choice_scores(
    option_scores: Sequence[torch.Tensor], examples: Sequence[Example], loss: float
) -> Scores:
    predicted = [int(s.argmax()) for s in option_scores]
    gold = [ex.label for ex in examples]
    correct = sum(p == g for p, g in zip(predicted, gold, strict=True))
    return Scores(correct / len(examples), loss, balanced_accuracy(predicted, gold))


# (token ids, number of leading context tokens that are not scored)
_Tokens = tuple[list[int], int]


class CausalLMRuntime(ModelRuntime):
    """Causal LM: answer NLL for training, option log-likelihood or generation to score.

    A sequence is [bos] + tokens(prompt + "\\n") + tokens(answer) (+ eos when training, so
    that generation learns to stop). Prompt and answer are tokenized apart, so the answer
    tokens are exactly the scored ones. Over `max_length` the answer is kept whole (up to
    max_length - 1 tokens) and the prompt loses its beginning.
    """

    def _load_base(self, dropout: float | None) -> Any:
        tok = self.tokenizer
        if tok.pad_token_id is None:  # LLaMA-style tokenizers have none; pads are masked
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        return load_causal_lm(self.settings.model_path, dropout, self.dtype)

    def _context_ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        ids = tok(prompt + "\n", add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id, *ids]
        if not ids:  # the first answer token must be predicted from something
            ids = [tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id]
        return ids

    def _sequence(self, prompt: str, target: str, *, eos: bool) -> _Tokens:
        tok = self.tokenizer
        answer = tok(target, add_special_tokens=False)["input_ids"]
        if eos and tok.eos_token_id is not None:
            answer = [*answer, tok.eos_token_id]
        limit = max(self.settings.max_length, 2)
        answer = answer[: limit - 1]
        context = self._context_ids(prompt)[-(limit - len(answer)) :]
        return context + answer, len(context)

    def _answer_logprobs(self, seqs: Sequence[_Tokens]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence, the summed log-probability of its scored tokens and their count."""
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        scored = torch.zeros((len(seqs), width), dtype=torch.bool)
        for row, (ids, n_context) in enumerate(seqs):  # right padding
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            scored[row, n_context : len(ids)] = True
        self.last_tokens = int(mask.sum())
        input_ids, mask, scored = (t.to(self.device) for t in (input_ids, mask, scored))
        logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        # token t is predicted at position t - 1; only the scored positions go to float32
        # (a full float32 copy of B x L x vocab logits would dominate the memory)
        targets, picked = input_ids[:, 1:], scored[:, 1:]
        token_lp = -torch.nn.functional.cross_entropy(
            logits[:, :-1][picked].float(), targets[picked], reduction="none"
        )
        rows = picked.nonzero()[:, 0]
        sums = torch.zeros(len(seqs), device=token_lp.device).index_add(0, rows, token_lp)
        return sums, picked.sum(dim=1)

    def loss(self, examples: Sequence[Example]) -> torch.Tensor:
        """Mean NLL per answer token (prompt tokens masked), over the batch."""
        seqs = [self._sequence(ex.prompt, ex.answer, eos=True) for ex in examples]
        sums, counts = self._answer_logprobs(seqs)
        return -sums.sum() / counts.sum().clamp(min=1)

    def _batches(self, items: Sequence[Any]) -> list[Sequence[Any]]:
        bs = max(self.settings.eval_batch_size, 1)
        return [items[i : i + bs] for i in range(0, len(items), bs)]

    @torch.no_grad()
    def mean_answer_nll(self, examples: Sequence[Example]) -> float:
        """The training loss over `examples`, per answer token."""
        self.model.eval()
        total, count = 0.0, 0
        for chunk in self._batches(examples):
            seqs = [self._sequence(ex.prompt, ex.answer, eos=True) for ex in chunk]
            sums, counts = self._answer_logprobs(seqs)
            total -= float(sums.sum())
            count += int(counts.sum())
        return total / max(count, 1)

    @torch.no_grad()
    def predict(self, examples: Sequence[Example]) -> list[torch.Tensor]:
        """Per multiple-choice example, the log-likelihood of each option (CPU float32)."""
        if any(ex.is_generation for ex in examples):
            raise ValueError("generation examples have no options to score: use generate()")
        self.model.eval()
        pairs = [
            self._sequence(ex.prompt, option, eos=False) for ex in examples for option in ex.options
        ]
        sums = [self._answer_logprobs(chunk)[0].cpu() for chunk in self._batches(pairs)]
        scores = torch.cat(sums)
        return list(torch.split(scores, [len(ex.options) for ex in examples]))

    @torch.no_grad()
    def generate(self, examples: Sequence[Example]) -> list[str]:
        """Greedy continuation of each prompt, up to `max_new_tokens` tokens."""
        self.model.eval()
        tok, s = self.tokenizer, self.settings
        out: list[str] = []
        for chunk in self._batches(examples):
            contexts = [self._context_ids(ex.prompt)[-max(s.max_length, 1) :] for ex in chunk]
            width = max(len(c) for c in contexts)
            # left padding: every row's continuation starts at the same column
            input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(contexts):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
            generated = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=s.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            out.extend(tok.batch_decode(generated[:, width:], skip_special_tokens=True))
        return [text.strip() for text in out]

    def _evaluate(self, examples: Sequence[Example]) -> Scores:
        """Accuracy or mean ROUGE-L F1, mean answer NLL per token, balanced accuracy."""
        loss = self.mean_answer_nll(examples)
        if task_kind(examples) == GENERATION:
            texts = self.generate(examples)
            scores = [rouge_l(t, ex.answer) for t, ex in zip(texts, examples, strict=True)]
            return Scores(sum(scores) / len(scores), loss)
        return _choice_scores(self.predict(examples), examples, loss)


_RUNTIMES: dict[tuple[Any, ...], ModelRuntime] = {}


def get_runtime(settings: Settings) -> ModelRuntime:
    """The process's runtime: the model is loaded on first use, then reused by every task
    with the same model settings (the cache key is everything that changes the model)."""
    key = (
        settings.model_kind,
        settings.model_path,
        settings.device,
        settings.precision,
        settings.gradient_checkpointing,
        settings.lora_r,
        settings.lora_alpha,
        settings.lora_dropout,
        settings.lora_target_modules,
        settings.base_dropout,
    )
    if key not in _RUNTIMES:
        _RUNTIMES[key] = ModelRuntime(settings)
        # The model and the libraries live as long as the process: take them out of the
        # cyclic GC, or every release_memory() scans them again (~490k objects: 0.4-0.7 s
        # a task on 2 busy CPU cores, the worker's largest overhead in `fedvec bench worker`).
        gc.collect()
        gc.freeze()
    runtime = _RUNTIMES[key]
    runtime.settings = settings
    return runtime
