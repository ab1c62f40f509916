"""Aggregation strategies: the baselines and FedBip behind one interface.

A strategy first makes a Plan over all contributions of a round (similarity + groups), then
personalizes: for one target client it returns that client's new base theta_bar_target.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from aggregator.aggregation import (
    relative_similarity_weights,
    similarity_weights,
    size_weights,
    staleness_discount,
    uniform_weights,
)
from aggregator.grouping import newcomer_group, relative_threshold, threshold_groups
from aggregator.similarity import cosine_matrix, layerwise_cosine_matrices
from aggregator.task_vectors import (
    InvalidTaskVector,
    StateDict,
    add_scaled,
    check_state_dict,
    flatten,
    layers,
    shapes,
)


# eq=False: generated __eq__ would compare tensors (ambiguous truth value) and __hash__ would
# try to hash dicts; identity semantics are what callers need.
@dataclass(frozen=True, eq=False)
class Contribution:
    client_id: int
    task_vector: StateDict  # tau_k
    # theta_k = (base theta_bar_k it started from) + tau_k: raw parameters, for FedAMP-style
    # similarity.
    trained: StateDict
    num_examples: int
    staleness: int = 0


@dataclass(frozen=True, eq=False)
class Plan:
    """What the strategy decided, for storing/showing."""

    similarity: torch.Tensor  # [n, n] over contributions in the given order (float64)
    groups: list[int]  # group label per contribution


def _validate(contributions: Sequence[Contribution]) -> dict[str, tuple[int, ...]]:
    """All task vectors and trained params share keys/shapes, float, finite; returns shapes."""
    if not contributions:
        raise ValueError("no contributions")
    expected = shapes(contributions[0].task_vector)
    for c in contributions:
        try:
            check_state_dict(c.task_vector, expected)
            check_state_dict(c.trained, expected)
        except InvalidTaskVector as e:
            raise InvalidTaskVector(f"contribution of client {c.client_id}: {e}") from e
    return expected


def _task_matrix(contributions: Sequence[Contribution]) -> torch.Tensor:
    return torch.stack([flatten(c.task_vector) for c in contributions])


def _task_cosine(contributions: Sequence[Contribution]) -> torch.Tensor:
    if not contributions:
        return torch.zeros((0, 0), dtype=torch.float64)
    _validate(contributions)
    return cosine_matrix(_task_matrix(contributions))


class Strategy(abc.ABC):
    name: ClassVar[str]

    def __init__(
        self,
        group_threshold: float = 0.1,
        staleness_exponent: float = 0.5,
        group_threshold_z: float = 0.0,
    ) -> None:
        staleness_discount(0, staleness_exponent)  # validates the exponent early
        self.group_threshold = float(group_threshold)
        self.staleness_exponent = float(staleness_exponent)
        # > 0: the threshold is relative_threshold(similarity, z) at every regrouping
        self.group_threshold_z = float(group_threshold_z)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(group_threshold={self.group_threshold}, "
            f"staleness_exponent={self.staleness_exponent}, "
            f"group_threshold_z={self.group_threshold_z})"
        )

    def threshold(self, similarity: torch.Tensor) -> float:
        """The grouping threshold for this similarity matrix."""
        if self.group_threshold_z > 0:
            return relative_threshold(similarity, self.group_threshold_z)
        return self.group_threshold

    @abc.abstractmethod
    def plan(
        self, contributions: Sequence[Contribution], similarity: torch.Tensor | None = None
    ) -> Plan:
        """similarity: the aggregator's task-vector similarity index for these contributions
        (None: the cosines of their task vectors)."""

    @abc.abstractmethod
    def _personalize(
        self, target: int, base: StateDict, contributions: Sequence[Contribution], plan: Plan
    ) -> StateDict: ...

    def personalize(
        self, target: int, base: StateDict, contributions: Sequence[Contribution], plan: Plan
    ) -> StateDict:
        """New theta_bar for contributions[target], given its current base theta_bar_target."""
        expected = _validate(contributions)
        n = len(contributions)
        if not 0 <= target < n:
            raise IndexError(f"target {target} out of range for {n} contributions")
        if tuple(plan.similarity.shape) != (n, n) or len(plan.groups) != n:
            raise ValueError(
                f"plan is for {len(plan.groups)} contributions "
                f"(similarity {tuple(plan.similarity.shape)}), got {n}"
            )
        try:
            check_state_dict(base, expected)
        except InvalidTaskVector as e:
            raise InvalidTaskVector(f"base of target client: {e}") from e
        return self._personalize(target, base, contributions, plan)

    # whether cold_start_weights can say yes: the aggregator then measures a newcomer's
    # affinity with its peers (it reads their models), else it does not
    places_newcomers: ClassVar[bool] = False

    def cold_start_weights(
        self, target: int, plan: Plan, affinity: dict[int, float]
    ) -> dict[int, float] | None:
        """When contributions[target] joins after others trained: the weights of the peers'
        current θ̄ it starts from (normalized). `affinity`: for each peer that has a
        personalized adapter, the cosine of the newcomer's update with that adapter's move
        from the initial one (grouping.newcomer_group). None: no cold start, the usual rule
        (`personalize`) applies.

        Why: the usual rule gives a newcomer the initial adapter plus one round of its
        peers' task vectors, small steps each taken from the peer's own base, so it
        inherits almost nothing of what its group accumulated."""
        return None

    def cold_start(
        self,
        target: int,
        contributions: Sequence[Contribution],
        weights: dict[int, float],
        peer_models: dict[int, StateDict],
    ) -> StateDict:
        """The newcomer's first θ̄: Σ_k w_k θ̄_k over its peers' current models, plus its own
        update τ_target (as `local` would apply it: its own data is not thrown away)."""
        if not weights or abs(sum(weights.values()) - 1.0) > 1e-6:
            raise ValueError(f"cold start weights must be non-empty and sum to 1: {weights}")
        models = [peer_models[k] for k in weights]
        zero = {key: torch.zeros_like(v, dtype=torch.float32) for key, v in models[0].items()}
        mixed = add_scaled(zero, models, list(weights.values()))
        return add_scaled(mixed, [contributions[target].task_vector], [1.0])

    @staticmethod
    def _normalized(weights: dict[int, float]) -> dict[int, float] | None:
        kept = {k: w for k, w in sorted(weights.items()) if w > 0}
        total = sum(kept.values())
        return {k: w / total for k, w in kept.items()} if kept and total > 0 else None

    def _discounts(self, contributions: Sequence[Contribution]) -> torch.Tensor:
        return torch.tensor(
            [staleness_discount(c.staleness, self.staleness_exponent) for c in contributions],
            dtype=torch.float64,
        )

    def _grouped_plan(
        self, contributions: Sequence[Contribution], similarity: torch.Tensor | None
    ) -> Plan:
        sim = _task_cosine(contributions) if similarity is None else similarity
        return Plan(similarity=sim, groups=threshold_groups(sim, self.threshold(sim)))

    @staticmethod
    def _group_of(target: int, plan: Plan) -> list[int]:
        return [k for k, g in enumerate(plan.groups) if g == plan.groups[target]]


class Local(Strategy):
    """No collaboration: each client keeps base + its own update."""

    name = "local"

    def plan(self, contributions, similarity=None) -> Plan:
        if contributions:
            _validate(contributions)
        n = len(contributions)
        return Plan(similarity=torch.eye(n, dtype=torch.float64), groups=list(range(n)))

    def _personalize(self, target, base, contributions, plan) -> StateDict:
        return add_scaled(base, [contributions[target].task_vector], [1.0])


class FedAvg(Strategy):
    """FedIT for LoRA: size-weighted mean of everyone's task vector, same for all clients."""

    name = "fedavg"

    def plan(self, contributions, similarity=None) -> Plan:
        # Similarity only for display; it does not affect the weights.
        sim = _task_cosine(contributions) if similarity is None else similarity
        return Plan(similarity=sim, groups=[0] * len(contributions))

    def _personalize(self, target, base, contributions, plan) -> StateDict:
        weights = size_weights([c.num_examples for c in contributions])
        return add_scaled(base, [c.task_vector for c in contributions], weights.tolist())

    places_newcomers = True

    def cold_start_weights(self, target, plan, affinity):
        # a newcomer to FedAvg downloads the global model (all clients' models agree)
        return self._normalized({k: 1.0 for k in affinity if k != target})


class FedAMPRaw(Strategy):
    """FedAMP-style attentive message passing with similarity on raw parameters.

    The baseline FedBip argues against: raw parameters are dominated by the shared pretrained
    weights, so their cosines are all ~1 and the weights are near-uniform.
    """

    name = "fedamp_raw"

    def plan(self, contributions, similarity=None) -> Plan:
        # raw parameters, not the task-vector index: that is the point of this baseline
        n = len(contributions)
        if n == 0:
            return Plan(similarity=torch.zeros((0, 0), dtype=torch.float64), groups=[])
        _validate(contributions)
        raw = torch.stack([flatten(c.trained) for c in contributions])
        return Plan(similarity=cosine_matrix(raw), groups=[0] * n)

    def _personalize(self, target, base, contributions, plan) -> StateDict:
        p = similarity_weights(plan.similarity[target], target, self._discounts(contributions))
        zero = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in base.items()}
        return add_scaled(zero, [c.trained for c in contributions], p.tolist())


class Grouped(Strategy):
    """The strategies over task-vector groups: the plan is the groups (at the fixed or
    relative threshold), and a newcomer starts from its group's current models."""

    uniform_cold_start: ClassVar[bool] = False  # else weighted by similarity (clipped at 0)

    def plan(self, contributions, similarity=None) -> Plan:
        return self._grouped_plan(contributions, similarity)

    places_newcomers = True

    def cold_start_weights(self, target, plan, affinity):
        """The peers' group that the newcomer's affinity picks (not the plan's group of the
        newcomer itself: see grouping.newcomer_group), weighted by affinity clipped at 0, or
        uniformly."""
        peer_groups = {k: plan.groups[k] for k in affinity if k != target}
        label = newcomer_group(affinity, peer_groups)
        if label is None:
            return None
        members = [k for k, g in sorted(peer_groups.items()) if g == label]
        return self._normalized(
            {k: 1.0 if self.uniform_cold_start else max(float(affinity[k]), 0.0) for k in members}
        )


class FedBip(Grouped):
    """Task-vector cosine, threshold groups, similarity-weighted task vectors in the group."""

    name = "fedbip"
    # a group's similarity row (the target at self_index) -> its members' weights
    weights: ClassVar[Callable[..., torch.Tensor]] = staticmethod(similarity_weights)

    def _personalize(self, target, base, contributions, plan) -> StateDict:
        members = self._group_of(target, plan)
        group = [contributions[k] for k in members]
        p = self.weights(
            plan.similarity[target, members], members.index(target), self._discounts(group)
        )
        return add_scaled(base, [c.task_vector for c in group], p.tolist())


class FedBipRelative(FedBip):
    """FedBip's groups, with each client weighted in its group as its nearest peer is
    (aggregation.relative_similarity_weights) instead of at similarity 1: the same rule
    made independent of the cosines' scale. Not in the paper; reported beside fedbip."""

    name = "fedbip_relative"
    weights = staticmethod(relative_similarity_weights)


class FedBipLayerwise(Grouped):
    """FedBip-L: groups from the whole-model cosine, weights per layer from that layer's cosine.

    Two tasks can share useful structure in some layers (e.g. attention) and conflict in others
    (e.g. the classifier); per-layer weights take the one without the other.
    """

    name = "fedbip_layerwise"

    def _personalize(self, target, base, contributions, plan) -> StateDict:
        members = self._group_of(target, plan)
        self_index = members.index(target)
        group = [contributions[k] for k in members]
        discounts = self._discounts(group)
        layer_sims = layerwise_cosine_matrices([c.task_vector for c in group])
        out: StateDict = {}
        for layer, keys in layers(base).items():
            p = similarity_weights(layer_sims[layer][self_index], self_index, discounts)
            part = add_scaled(
                {k: base[k] for k in keys},
                [{k: c.task_vector[k] for k in keys} for c in group],
                p.tolist(),
            )
            out.update(part)
        return {k: out[k] for k in sorted(out)}


class Clustered(Grouped):
    """Clustered FL: FedBip's groups, plain mean of the group's task vectors."""

    name = "clustered"
    uniform_cold_start = True

    def _personalize(self, target, base, contributions, plan) -> StateDict:
        members = self._group_of(target, plan)
        weights = uniform_weights(len(members))
        return add_scaled(base, [contributions[k].task_vector for k in members], weights.tolist())


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (Local, FedAvg, FedAMPRaw, FedBip, FedBipRelative, FedBipLayerwise, Clustered)
}


def get_strategy(name: str, **kwargs) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        known = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"unknown strategy {name!r}; known strategies: {known}") from None
    return cls(**kwargs)
