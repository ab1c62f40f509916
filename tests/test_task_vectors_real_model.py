"""Task vectors of the real model: two clients fine-tuned on different tasks from the same
starting adapter have nearly identical raw parameters but clearly different task vectors
(why fedvec compares clients by task vectors)."""

from __future__ import annotations

import pytest

from aggregator.similarity import cosine
from aggregator.task_vectors import flatten, task_vector
from services.client_data import load_examples
from services.demo_data import build_demo_clients
from services.settings import load_settings
from workers.model import ModelRuntime

pytestmark = pytest.mark.slow


def test_raw_parameters_look_alike_task_vectors_do_not(tmp_path):
    # 12 steps: after 6 at the default learning rate the task vectors are still mostly noise
    settings = load_settings(environ={}).replace(
        max_length=48, batch_size=4, epochs=2, max_steps=12
    )
    clients = {c.name: c for c in build_demo_clients(tmp_path, train_per_client=24)}
    runtime = ModelRuntime(settings)
    start = runtime.initial_adapter()
    news = load_examples(clients["news-a"].train_path)
    tweets = load_examples(clients["tweets-a"].train_path)
    theta_news = runtime.train(start, news, seed=1).adapter
    theta_tweets = runtime.train(start, tweets, seed=1).adapter
    theta_news2 = runtime.train(start, load_examples(clients["news-b"].train_path), seed=2).adapter

    raw = cosine(runtime.effective_weights(theta_news), runtime.effective_weights(theta_tweets))
    tv = cosine(flatten(task_vector(theta_news, start)), flatten(task_vector(theta_tweets, start)))
    tv_same_family = cosine(
        flatten(task_vector(theta_news, start)), flatten(task_vector(theta_news2, start))
    )
    assert raw > 0.99
    assert tv < 0.9 and tv < raw - 0.1
    assert tv_same_family > tv  # two news clients resemble each other more


def test_initial_adapter_is_the_same_everywhere():
    settings = load_settings(environ={})
    a = ModelRuntime(settings).initial_adapter()
    b = ModelRuntime(settings).initial_adapter()
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # LoRA r=8 on query, key, value and the three dense layers of 6 blocks, plus the head
    assert sum(v.numel() for v in a.values()) == 332_161
