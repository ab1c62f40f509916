"""Count sketches of task vectors: a fixed-size summary whose cosines estimate the exact ones.

sketch(τ)[b] = Σ_{i: h(i) = b} σ(i) · τ_i, with the bucket h(i) and the sign σ(i) = ±1 taken
from an integer hash of the coordinate index i and a seed. Nothing of size k × d exists, the
work is O(d), and because h and σ depend only on the global index, any device and any
chunking of the vector give the same sketch up to float rounding (float64 accumulation), so
a GPU worker and a CPU worker sketch alike. The sketch is linear: sketch(a·x + b·y) =
a·sketch(x) + b·sketch(y).

Buckets are balanced: coordinate i = q·k + p goes to bucket (p + r(q)) mod k with a hashed
rotation r(q) per block of k coordinates, so every bucket holds d/k coordinates (±1) and
two coordinates collide with probability 1/k, as with a fully hashed bucket, but never more
than needed; for d <= k nothing collides and the sketch is exact. Random signs make every
estimate unbiased whatever the bucket pattern.

Accuracy. With normalized sketches, cos(sketch(x), sketch(y)) estimates cos(x, y) with
standard deviation ≈ (1 − ρ²) · sqrt((1 − k/d) / k) for d >= k (ρ: the exact cosine). The
error is largest for unrelated pairs (ρ ≈ 0): at k = 1,024 the 99th percentile of |error|
is ≈ 2.58 / 32 = 0.08; 0.02 at p99 needs k ≳ 16,600 when d ≫ k — a limit of every linear
sketch (Johnson–Lindenstrauss is optimal up to constants), not of this one.
DEFAULT_SKETCH_DIM = 20,480 gives p99 ≈ 0.018 at ρ ≈ 0 (less for related pairs and for
smaller d) for 80 KB per client, 820 MB for 10,000 clients; the index's similarity row costs
one pass over N × k floats.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping

import torch

# See the module docstring for why 20,480: p99 |cos error| ≈ 0.018 at ρ ≈ 0 when d ≫ k.
DEFAULT_SKETCH_DIM = 20_480
DEFAULT_SKETCH_SEED = 0

_M32 = 0xFFFFFFFF
# Hashing works on 32-bit values held in int64: x < 2^32 and the multipliers are < 2^31, so
# products stay below 2^63 and no backend's signed overflow is ever involved.
_MUL1 = 0x21F0AAAD
_MUL2 = 0x735A2D97
_CHUNK = 1 << 20  # coordinates hashed at a time: bounds temporary memory to ~30 MB


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer (xorshift-multiply, constants from C. Wellons'
    hash prospector); x: int64 with values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _M32
    return x ^ (x >> 15)


def _seed_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys derived from the seed: one for the bucket, one for the sign (odd
    constants first, because the mixer maps 0 to 0)."""
    lo = torch.tensor([(seed & _M32) ^ 0x85EBCA6B], dtype=torch.int64)
    hi = (seed >> 32) & _M32
    a = int(_mix32(_mix32(lo) ^ hi ^ 0xC2B2AE35)[0])
    b = int(_mix32(torch.tensor([a ^ 0x9E3779B9], dtype=torch.int64))[0])
    return a, b


@functools.lru_cache(maxsize=16)
def _block_layout(
    block: int, size: int, k: int, seed: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layout of the coordinates [block · 2^20, block · 2^20 + size), cached: hashing costs
    far more than the sketch itself on a CPU, and a worker sketches the same shapes every
    time (16 entries of at most 2^20 coordinates: 200 MB at most)."""
    key_bucket, key_sign = _seed_keys(seed)
    start = block * _CHUNK
    idx = torch.arange(start, start + size, dtype=torch.int64, device=device)
    # one rotation per block of k coordinates: buckets stay balanced (see the docstring)
    rotation = _mix32(torch.div(idx, k, rounding_mode="floor") ^ key_bucket) % k
    bucket = (idx % k + rotation) % k
    sign = (_mix32(idx ^ key_sign) >> 31).to(torch.float64).mul_(-2.0).add_(1.0)
    return bucket, sign


def _pieces(start: int, stop: int, k: int, seed: int, device: torch.device | str):
    """(a, b, bucket, sign) over [start, stop) cut at the cached blocks' edges (views into
    the cache: never modify them)."""
    if k <= 0:
        raise ValueError(f"sketch size k must be > 0, got {k}")
    if not 0 <= start <= stop <= 1 << 32:
        raise ValueError(f"coordinate range [{start}, {stop}) outside [0, 2^32)")
    a = start
    while a < stop:
        block = a // _CHUNK
        b = min(stop, (block + 1) * _CHUNK)
        lo, hi = a - block * _CHUNK, b - block * _CHUNK
        # a short vector hashes only its own length (rounded up to a power of two, so
        # nearby lengths share the cache entry)
        size = min(_CHUNK, max(4096, 1 << (hi - 1).bit_length()))
        bucket, sign = _block_layout(block, size, k, seed, str(torch.device(device)))
        yield a, b, bucket[lo:hi], sign[lo:hi]
        a = b


def layout(
    start: int, stop: int, k: int, seed: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket (int64, in [0, k)) and sign (float64, ±1) of the coordinates [start, stop)."""
    parts = list(_pieces(start, stop, k, seed, device))
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty.to(torch.float64)
    return torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])


def sketch_into(acc: torch.Tensor, chunk: torch.Tensor, offset: int, seed: int) -> torch.Tensor:
    """Add the coordinates [offset, offset + len(chunk)) of a vector to the float64
    accumulator acc [k] (in place; returns acc). Sketching a vector piece by piece in any
    order gives its sketch."""
    if acc.dim() != 1 or acc.dtype != torch.float64:
        raise ValueError("sketch_into: acc must be a 1-D float64 tensor")
    flat = chunk.detach().reshape(-1)
    k = acc.numel()
    for a, b, bucket, sign in _pieces(offset, offset + flat.numel(), k, seed, acc.device):
        piece = flat[a - offset : b - offset].to(device=acc.device, dtype=torch.float64)
        acc.index_add_(0, bucket, piece * sign)
    return acc


def sketch_chunks(
    chunks: Iterable[torch.Tensor],
    k: int = DEFAULT_SKETCH_DIM,
    seed: int = DEFAULT_SKETCH_SEED,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sketch of the concatenation of chunks (each flattened), as float32 [k]."""
    acc: torch.Tensor | None = None
    offset = 0
    for chunk in chunks:
        if acc is None:
            acc = torch.zeros(k, dtype=torch.float64, device=device or chunk.device)
        sketch_into(acc, chunk, offset, seed)
        offset += chunk.numel()
    if acc is None:
        return torch.zeros(k, dtype=torch.float32, device=device or "cpu")
    return acc.to(torch.float32)


def sketch(
    vector: torch.Tensor, k: int = DEFAULT_SKETCH_DIM, seed: int = DEFAULT_SKETCH_SEED
) -> torch.Tensor:
    """Count sketch of a (flattened) vector: float32 [k] on the vector's device."""
    return sketch_chunks([vector], k, seed, device=vector.device)


def sketch_state_dict(
    sd: Mapping[str, torch.Tensor], k: int = DEFAULT_SKETCH_DIM, seed: int = DEFAULT_SKETCH_SEED
) -> torch.Tensor:
    """Sketch of task_vectors.flatten(sd) (keys in sorted order) without building it."""
    return sketch_chunks((sd[key] for key in sorted(sd)), k, seed)


def sketch_rows(
    vectors: torch.Tensor, k: int = DEFAULT_SKETCH_DIM, seed: int = DEFAULT_SKETCH_SEED
) -> torch.Tensor:
    """Sketches of the rows of [n, d] at once (float32 [n, k]). Equal to sketching each row
    alone, up to float rounding."""
    if vectors.dim() != 2:
        raise ValueError(f"sketch_rows: expected [n, d], got shape {tuple(vectors.shape)}")
    n, d = vectors.shape
    acc = torch.zeros(n, k, dtype=torch.float64, device=vectors.device)
    step = max(1, min(_CHUNK, (1 << 22) // max(1, n)))  # float64 temporaries <= 32 MB
    for a0 in range(0, d, step):
        for a, b, bucket, sign in _pieces(a0, min(d, a0 + step), k, seed, vectors.device):
            acc.index_add_(1, bucket, vectors[:, a:b].detach().to(torch.float64) * sign)
    return acc.to(torch.float32)


def normalize(sketches: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (float32); zero rows stay zero (cosine 0 with everything)."""
    s = sketches.to(torch.float32)
    norms = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
    return torch.where(norms > 0, s / torch.where(norms > 0, norms, 1.0), 0.0)


def sketch_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Estimated cosine of two vectors from their sketches; 0.0 if either is zero."""
    if a.shape != b.shape:
        raise ValueError(f"sketch_cosine: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")
    x, y = a.to(torch.float64), b.to(torch.float64)
    nx, ny = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    if nx == 0 or ny == 0:
        return 0.0
    return float(torch.clamp(torch.dot(x, y) / (nx * ny), -1.0, 1.0))


def sketch_similarity(
    queries: torch.Tensor, keys: torch.Tensor, *, normalized: bool = False
) -> torch.Tensor:
    """[B, k] × [N, k] -> [B, N] estimated cosines (float32) in one matrix product.

    normalized=True: both are already unit rows (the index keeps its rows that way, so the
    product is the whole cost: one pass over N × k floats)."""
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"sketch_similarity: expected [B, k] and [N, k], got {tuple(queries.shape)} "
            f"and {tuple(keys.shape)}"
        )
    if not normalized:
        queries, keys = normalize(queries), normalize(keys)
    return (queries @ keys.T).clamp_(-1.0, 1.0)


def expected_error(k: int, d: int, rho: float = 0.0) -> float:
    """Standard deviation of the sketch cosine at exact cosine rho (see the module docstring);
    for documentation and for choosing k, not used in computations."""
    if d <= k:
        return 0.0
    return (1.0 - rho * rho) * math.sqrt((1.0 - k / d) / k)


def to_bytes(s: torch.Tensor) -> bytes:
    """A sketch as stored on the update row: float32, little-endian."""
    flat = s.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return flat.numpy().astype("<f4").tobytes()


def from_bytes(data: bytes, k: int) -> torch.Tensor:
    """The stored sketch back as float32 [k]; ValueError if it is not k finite floats."""
    if len(data) != 4 * k:
        raise ValueError(f"stored sketch has {len(data)} bytes, expected {4 * k} (k={k})")
    s = torch.frombuffer(bytearray(data), dtype=torch.float32)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("stored sketch has NaN/Inf entries")
    return s
