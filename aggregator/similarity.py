"""Cosine similarity between task vectors (whole-model and per layer), in float64."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aggregator.task_vectors import InvalidTaskVector, StateDict, flatten, layers


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the flattened tensors; 0.0 if either is the zero vector.

    float64 because task vectors are tiny next to the weights and float32 dot products over
    millions of entries lose the digits that tell clients apart.
    """
    x = a.detach().reshape(-1).to(torch.float64)
    y = b.detach().reshape(-1).to(torch.float64)
    if x.numel() != y.numel():
        raise ValueError(f"cosine: sizes differ ({x.numel()} vs {y.numel()})")
    nx = torch.linalg.vector_norm(x)
    ny = torch.linalg.vector_norm(y)
    if nx == 0 or ny == 0:
        return 0.0
    return float(torch.clamp(torch.dot(x, y) / (nx * ny), -1.0, 1.0))


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """[n, d] -> [n, n] float64 cosines; exactly symmetric, diagonal exactly 1.

    A zero row has cosine 0 with everyone else but 1 with itself, so a client that did not
    move still counts as fully similar to itself.
    """
    if vectors.dim() != 2:
        raise ValueError(f"cosine_matrix: expected [n, d], got shape {tuple(vectors.shape)}")
    v = vectors.detach().to(torch.float64)
    norms = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    unit = torch.where(norms > 0, v / torch.where(norms > 0, norms, 1.0), 0.0)
    sim = unit @ unit.T
    sim = torch.clamp((sim + sim.T) / 2, -1.0, 1.0)  # exact symmetry despite rounding
    sim.fill_diagonal_(1.0)
    return sim


def layerwise_cosine_matrices(sds: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """Layer -> [n, n] cosine matrix over that layer's keys (all sds must share keys)."""
    if not sds:
        return {}
    keys = set(sds[0])
    for i, sd in enumerate(sds[1:], start=1):
        if set(sd) != keys:
            diff = sorted(keys.symmetric_difference(sd))
            raise InvalidTaskVector(
                f"layerwise_cosine_matrices: state dict {i} keys differ: {diff}"
            )
    out: dict[str, torch.Tensor] = {}
    for layer, layer_keys in layers(keys).items():
        rows = [flatten({k: sd[k] for k in layer_keys}) for sd in sds]
        out[layer] = cosine_matrix(torch.stack(rows))
    return out


def smoothed_similarity(
    now: torch.Tensor, previous: torch.Tensor, unchanged: torch.Tensor, memory: float
) -> torch.Tensor:
    """The similarity index after new task vectors arrived.

    now: [n, n] cosines of the clients' latest task vectors; previous: [n, n] the index's
    stored values (NaN where the pair has none); unchanged: [n, n] bool, True where neither
    client's vector changed since the stored value. Pairs with new information move to
    memory·previous + (1 − memory)·now; unchanged pairs keep their value. Why: late in
    training a short run's task vector is mostly optimizer noise, so one round's cosine is
    a noisy estimate of how alike two clients are; memory 0 is the paper's per-round cosine.
    """
    if not 0.0 <= memory < 1.0:
        raise ValueError(f"similarity memory must be in [0, 1), got {memory}")
    if now.shape != previous.shape or now.shape != unchanged.shape:
        raise ValueError("smoothed_similarity: shapes differ")
    now = now.to(torch.float64)
    known = torch.isfinite(previous)
    prev = torch.where(known, previous.to(torch.float64), now)
    blended = memory * prev + (1.0 - memory) * now
    out = torch.where(known & unchanged, prev, blended)
    out = (out + out.T) / 2
    out.fill_diagonal_(1.0)
    return out
