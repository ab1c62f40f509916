"""Metrics without a dependency: ROUGE-L for generation tasks, balanced accuracy for
multiple choice.

`rouge_l` is ROUGE-L F1 as Google's rouge-score package computes `rougeL` with its
default tokenizer and no stemming: lower-case, every run of characters other than
ASCII letters and digits is a separator (so punctuation is dropped, and a non-ASCII
letter splits a word, as it does there), then the F-measure of the longest common
subsequence of the two token lists.
"""

from __future__ import annotations

import re

_SEPARATORS = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """The tokens rouge-score compares: lower-cased runs of ASCII letters and digits."""
    return _SEPARATORS.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one DP row: O(len(a)·len(b)) time)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of `prediction` against `reference`, in [0, 1]; 0 when either has no
    tokens (rouge-score's convention)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def balanced_accuracy(predicted: list[int], gold: list[int]) -> float:
    """Mean recall over the gold answers present (classes by answer position, as the
    majority baseline counts them): a model that always gives one answer scores 1/k on k
    answers, however skewed the test split is. 0.0 for no examples."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} gold answers")
    hits: dict[int, list[int]] = {}
    for p, g in zip(predicted, gold, strict=True):
        hits.setdefault(g, []).append(int(p == g))
    if not hits:
        return 0.0
    return sum(sum(h) / len(h) for h in hits.values()) / len(hits)
