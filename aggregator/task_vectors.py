"""Task vectors over PEFT/LoRA state dicts: validation, arithmetic, flattening.

A task vector is tau = theta_trained - theta_base. Everything here is pure: new tensors in,
new tensors out, nothing is modified in place.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]

# LoRA's A and B factors of one module are one layer: their product is the module's update,
# so comparing A alone or B alone would be meaningless.
_LORA_SUFFIX = re.compile(r"\.lora_(?:A|B)(?:\.[^.]+)?\.weight$|\.lora_embedding_(?:A|B)$")

# Cap how many keys an error message lists, so a wholly wrong upload stays readable.
_MAX_LISTED = 10


class InvalidTaskVector(ValueError):
    """A state dict / task vector that cannot be used; the message says exactly what is wrong."""


def layer_of(key: str) -> str:
    """Layer (module) a parameter key belongs to.

    LoRA keys drop their ".lora_A.weight"/".lora_B.weight" suffix; any other key drops its last
    segment, so e.g. the classifier's weight and bias form one layer.
    """
    stripped = _LORA_SUFFIX.sub("", key)
    if stripped != key:
        return stripped
    head, sep, _ = key.rpartition(".")
    return head if sep else key


def layers(keys: Iterable[str]) -> dict[str, list[str]]:
    """Layer name -> its keys; layers and keys sorted, so iteration order is fixed."""
    out: dict[str, list[str]] = {}
    for key in sorted(set(keys)):
        out.setdefault(layer_of(key), []).append(key)
    return {layer: out[layer] for layer in sorted(out)}


def shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(int(d) for d in value.shape) for key, value in sd.items()}


def _listed(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return f"{shown} (and {more} more)" if more > 0 else shown


def check_state_dict(
    sd: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype | None = None,
) -> None:
    """Raise InvalidTaskVector unless sd has exactly the expected keys/shapes, float (of
    exactly `dtype` when given), finite.

    All problems are collected into one message so a client sees everything wrong at once.
    `dtype` matters for received files: a float64 value beyond float32's range is finite
    where it is checked and Inf once the math casts it to float32.
    """
    problems: list[str] = []
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_listed(unexpected)}")
    for key in sorted(set(sd) & set(expected)):
        value = sd[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"key {key!r}: expected a tensor, got {type(value).__name__}")
            continue
        want = tuple(int(d) for d in expected[key])
        got = tuple(int(d) for d in value.shape)
        if got != want:
            problems.append(f"key {key!r}: expected shape {want}, got {got}")
        if not value.is_floating_point():
            problems.append(f"key {key!r}: expected a floating dtype, got {value.dtype}")
            continue
        if dtype is not None and value.dtype != dtype:
            problems.append(f"key {key!r}: expected dtype {dtype}, got {value.dtype}")
            continue
        n_nan = int(torch.isnan(value).sum())
        n_inf = int(torch.isinf(value).sum())
        if n_nan or n_inf:
            problems.append(f"key {key!r}: {n_nan} NaN and {n_inf} Inf value(s) of {value.numel()}")
    if problems:
        raise InvalidTaskVector("; ".join(problems))


def _same_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], what: str) -> None:
    missing = set(b) - set(a)
    extra = set(a) - set(b)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_listed(missing)}")
        if extra:
            parts.append(f"unexpected {_listed(extra)}")
        raise InvalidTaskVector(f"{what}: key sets differ: " + "; ".join(parts))
    for key in a:
        if a[key].shape != b[key].shape:
            raise InvalidTaskVector(
                f"{what}: key {key!r}: expected shape {tuple(b[key].shape)}, "
                f"got {tuple(a[key].shape)}"
            )


def norm(sd: Mapping[str, torch.Tensor]) -> float:
    """Euclidean norm of the flattened state dict (float64 accumulation)."""
    return float(sum(float((v.double() ** 2).sum()) for v in sd.values()) ** 0.5)


def task_vector(trained: StateDict, base: StateDict) -> StateDict:
    """tau = trained - base, in float32; both must have the same keys and shapes."""
    _same_keys(trained, base, "task_vector(trained, base)")
    return {
        key: trained[key].detach().to(torch.float32) - base[key].detach().to(torch.float32)
        for key in sorted(base)
    }


def add_scaled(base: StateDict, deltas: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """base + sum_k w_k * delta_k as new float32 tensors.

    Accumulates in float64 (cheap at LoRA sizes) so the result does not depend on how many
    clients are summed; terms with weight exactly 0 are skipped, so a client nobody resembles
    keeps exactly base + its own tau.
    """
    if len(deltas) != len(weights):
        raise ValueError(f"add_scaled: {len(deltas)} deltas but {len(weights)} weights")
    ws = [float(w) for w in weights]
    for i, (delta, w) in enumerate(zip(deltas, ws, strict=True)):
        if w != w or w in (float("inf"), float("-inf")):
            raise ValueError(f"add_scaled: weight {i} is not finite ({w})")
        _same_keys(delta, base, f"add_scaled: delta {i}")
    out: StateDict = {}
    for key in sorted(base):
        acc = base[key].detach().to(torch.float64).clone()
        for delta, w in zip(deltas, ws, strict=True):
            if w != 0.0:
                acc.add_(delta[key].detach().to(torch.float64), alpha=w)
        out[key] = acc.to(torch.float32)
    return out


def flatten(sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """1-D float32 vector, keys in sorted order: a fixed, named parameter order."""
    if not sd:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([sd[key].detach().reshape(-1).to(torch.float32) for key in sorted(sd)])


def unflatten(vec: torch.Tensor, like: Mapping[str, torch.Tensor]) -> StateDict:
    """Inverse of flatten: cut vec into like's keys (sorted order) and shapes, float32."""
    if vec.dim() != 1:
        raise ValueError(f"unflatten: expected a 1-D vector, got shape {tuple(vec.shape)}")
    total = sum(like[key].numel() for key in like)
    if vec.numel() != total:
        raise InvalidTaskVector(
            f"unflatten: vector has {vec.numel()} elements, state dict needs {total}"
        )
    out: StateDict = {}
    offset = 0
    for key in sorted(like):
        n = like[key].numel()
        out[key] = vec[offset : offset + n].reshape(like[key].shape).to(torch.float32).clone()
        offset += n
    return out
