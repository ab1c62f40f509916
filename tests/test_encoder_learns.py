"""The encoder formulation learns: mean pooling into the shared scoring head, LoRA on every
linear layer, the default learning rate. A tiny synthetic multiple-choice task (which of
three words does the sentence name) goes from chance to well above it on records it never
saw, within a dozen steps; the head and the pooling are what an exported adapter loads."""

from __future__ import annotations

import random

import pytest
from peft import PeftModel

from services.client_data import Example
from services.settings import load_settings
from workers.model import ModelRuntime, load_base_model
from workers.pair_scorer import PairScorer

pytestmark = pytest.mark.slow
WORDS = ("apple", "river", "engine")
TEMPLATES = (
    "My neighbour talked about the {} all evening.",
    "Yesterday the {} was in every conversation.",
    "A short story about a {} won the prize.",
    "Nobody expected the {} to matter so much.",
)


def records(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = rng.choice(WORDS)
        prompt = rng.choice(TEMPLATES).format(word) + " What is it about?"
        out.append(Example(prompt=prompt, options=WORDS, answer=word))
    return out


def test_a_small_multiple_choice_task_is_learned_above_chance(tmp_path):
    settings = load_settings(environ={}, dotenv=tmp_path / "no.env").replace(
        epochs=2, batch_size=8, torch_threads=2
    )
    assert settings.lora_target_modules == "query,key,value,dense"
    runtime = ModelRuntime(settings)
    assert isinstance(runtime.model.base_model.model, PairScorer)
    start = runtime.initial_adapter()
    train, held_out = records(48, 0), records(30, 1)
    runtime.load_adapter(start)
    before = runtime.evaluate(held_out)
    result = runtime.train(start, train, seed=0)
    assert result.steps == 12
    runtime.load_adapter(result.adapter)
    after = runtime.evaluate(held_out)
    assert before.balanced_accuracy < 0.6  # about 1/3: the head starts near zero
    assert after.score >= 0.8 and after.balanced_accuracy >= 0.8
    assert after.loss < before.loss

    # an exported adapter (peft's own files) scores exactly as the worker does
    runtime.model.save_pretrained(tmp_path / "adapter")
    exported = PeftModel.from_pretrained(load_base_model(settings.model_path), tmp_path / "adapter")
    exported.eval()
    enc = runtime.tokenizer(
        [held_out[0].prompt] * 3, list(WORDS), padding=True, return_tensors="pt"
    )
    got = exported(**enc).logits.squeeze(-1)
    expected = runtime.predict(held_out[:1])[0]
    assert got.detach().allclose(expected, atol=1e-5)
