"""Central (update-level) differential privacy: clip whole client updates, noise their mean.

This is DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private
Recurrent Language Models", Algorithm 1 with the fixed-denominator estimator), the mechanism
behind Flower's ``DifferentialPrivacyServerSideFixedClipping`` and
``DifferentialPrivacyClientSideFixedClipping``. In each round, with global weights ``w``:

1. each sampled client's update ``Δ_k = w_k − w`` is clipped to L2 norm ``C`` over all its
   floating-point entries jointly (:func:`clip_update`; by the server, or by the client before
   it sends);
2. the server averages the clipped updates **uniformly** over the ``m`` clients
   (:func:`uniform_mean`), so one client moves the mean by at most ``C/m``;
3. the server adds ``N(0, (σ·C/m)²)`` to every coordinate of the mean update
   (:func:`add_central_noise`).

The protected unit is a whole client (user-level DP). ε after ``T`` rounds with client
sampling rate ``q`` is the subsampled Gaussian mechanism's, from Opacus' RDP accountant
(:func:`central_epsilon`).

**Why unweighted.** FedAvg weights client ``k`` by ``n_k/Σn``: a client holding most of the
examples would then move the aggregate by up to ``C·n_k/Σn ≫ C/m`` and the noise ``σ·C/m``
would not cover it. A uniform mean of clipped updates has sensitivity ``C/m`` whatever the
clients report as ``num-examples``, as in McMahan et al. with equal user weights (Flower's own
accounted DP mode likewise requires equal client weights).

:class:`CentralDP` wraps any linear aggregator (``fedavg``, ``fedprox``, ``fedavgm``, or a plugin
that declares ``linear``) with these steps, around a plain or a secure exchange.

The norm, clipping and standard deviation come from Flower's helpers
(``flwr.supercore.differential_privacy``: ``get_norm``, ``clip_inputs_inplace``,
``compute_stdv``), applied to float64 copies of the entries. Flower's noise helper draws from
NumPy's global generator; here noise comes from a caller-supplied ``torch.Generator`` instead,
so a server can make a round's noise reproducible (or secret) on purpose.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.supercore.differential_privacy import clip_inputs_inplace, compute_stdv, get_norm

from fedvlm.errors import ConfigError
from fedvlm.federation import keys
from fedvlm.federation.aggregation import Aggregator, AggregatorWrapper, RoundReplies
from fedvlm.privacy.accountant import compute_epsilon

State = dict[str, torch.Tensor]


def _float64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float64)


def _check_same_keys(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str) -> None:
    missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or extra:
        raise ValueError(f"{what} does not match the reference state: missing {missing}, unexpected {extra}")
    for key, value in state.items():
        if value.shape != reference[key].shape:
            raise ValueError(
                f"{what}[{key!r}] has shape {tuple(value.shape)}, the reference {tuple(reference[key].shape)}"
            )


def clip_update(
    local: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], clipping_norm: float
) -> tuple[State, float]:
    """Clip a client's update ``local − reference`` to L2 norm ``clipping_norm`` (DP-FedAvg's ``π_C``).

    The norm is taken over all floating-point entries jointly (Flower's "FlatClip", McMahan et
    al. 2018 §3): ``Δ ← Δ · min(1, C/‖Δ‖₂)``. Non-float entries (e.g. ``num_batches_tracked``)
    carry no gradient signal and are returned as they are in ``local``.

    Args:
        local: The client's state after local training.
        reference: The global state the client started from (same keys and shapes).
        clipping_norm: C > 0.

    Returns:
        ``(state, norm)``: ``reference + clipped Δ`` for floating-point keys (each in its
        original dtype and device; an update already inside the ball is returned unchanged) and
        ``local``'s own tensors for the others, in ``local``'s key order; and ``‖Δ‖₂`` before
        clipping.

    Raises:
        ValueError: If ``clipping_norm <= 0`` or the keys or shapes of the two states differ.

    Example:
        >>> reference = {"w": torch.zeros(3), "steps": torch.tensor(7)}
        >>> clipped, norm = clip_update({"w": torch.tensor([3.0, 4.0, 0.0]), "steps": torch.tensor(9)}, reference, 1.0)
        >>> norm, clipped["w"], clipped["steps"]
        (5.0, tensor([0.6000, 0.8000, 0.0000]), tensor(9))
    """
    if not clipping_norm > 0:
        raise ValueError(f"clipping norm {clipping_norm} must be positive")
    _check_same_keys(local, reference, "local state")
    float_keys = [key for key, value in local.items() if value.is_floating_point()]
    deltas = [(_float64(local[key]) - _float64(reference[key])).numpy() for key in float_keys]
    norm = get_norm(deltas)
    if norm <= clipping_norm:  # also spares Flower's clip a division by a zero norm
        return dict(local), norm
    clip_inputs_inplace(deltas, clipping_norm)
    clipped = {
        key: (_float64(reference[key]) + torch.from_numpy(delta)).to(dtype=local[key].dtype, device=local[key].device)
        for key, delta in zip(float_keys, deltas, strict=True)
    }
    return {key: clipped.get(key, value) for key, value in local.items()}, norm


def uniform_mean(states: Sequence[Mapping[str, torch.Tensor]]) -> State:
    """The unweighted mean of client states: the aggregate central DP's sensitivity ``C/m`` needs.

    With updates clipped to ``C``, ``mean_k(w + Δ_k) = w + (1/m)·Σ_k Δ_k`` moves by at most
    ``C/m`` when one client's update changes. FedAvg's ``num-examples`` weighting would not be
    bounded by ``C/m`` (see the module docstring), so under central DP fedavg and fedprox
    aggregate with this mean instead.

    Computed in float64 and cast back to each entry's dtype (integer buffers are averaged and
    truncated, as in ``fedvlm.federation.robust``).

    Args:
        states: The ``m ≥ 1`` client states (same keys and shapes), e.g. after :func:`clip_update`.

    Returns:
        The mean state, in the first state's key order, dtypes and devices.

    Raises:
        ValueError: If ``states`` is empty or their keys or shapes differ.

    Example:
        >>> uniform_mean([{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}])["w"]
        tensor([2., 4.])
    """
    if not states:
        raise ValueError("cannot average zero client states")
    first = states[0]
    for index, state in enumerate(states[1:], start=1):
        _check_same_keys(state, first, f"client state {index}")
    return {
        key: (torch.stack([_float64(state[key]) for state in states]).sum(dim=0) / len(states)).to(
            dtype=value.dtype, device=value.device
        )
        for key, value in first.items()
    }


def add_central_noise(
    aggregate: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    noise_multiplier: float,
    clipping_norm: float,
    num_clients: int,
    generator: torch.Generator,
) -> State:
    """Add DP-FedAvg's Gaussian noise ``N(0, (σ·C/m)²)`` to the aggregated update.

    Every floating-point coordinate of ``Δ = aggregate − reference`` gets independent noise of
    standard deviation ``σ·C/m`` (Flower's ``compute_stdv``), and ``reference + Δ + noise`` is
    returned; non-float entries are the aggregate's. ``num_clients`` must be the ``m`` that
    :func:`uniform_mean` divided by (the number of clipped updates averaged), so the noise
    matches the sensitivity ``C/m``.

    Noise is drawn from ``generator`` (on the generator's device), entry by entry in sorted key
    order, so the same generator state gives the same result. Whoever can reproduce the
    generator's seed can subtract the noise: seed it from a secret unless reproducibility is
    wanted more than privacy (see docs/privacy.md).

    Args:
        aggregate: The uniform mean of the clipped client states.
        reference: The global state of the round (same keys and shapes).
        noise_multiplier: σ ≥ 0 (0: no noise, the aggregate's float entries are returned as they are).
        clipping_norm: C > 0, the bound the updates were clipped to.
        num_clients: m ≥ 1, the number of updates in the mean.
        generator: The source of the noise.

    Returns:
        The noised state, in ``aggregate``'s key order, dtypes and devices.

    Raises:
        ValueError: On a negative σ, a non-positive C or m, or states that do not match.

    Example:
        >>> reference = {"w": torch.zeros(4)}
        >>> aggregate = {"w": torch.ones(4)}
        >>> def noised(seed: int) -> torch.Tensor:
        ...     return add_central_noise(aggregate, reference, 1.0, 1.0, 2, torch.Generator().manual_seed(seed))["w"]
        >>> torch.equal(noised(0), noised(0)), torch.equal(noised(0), noised(1))
        (True, False)
        >>> torch.equal(add_central_noise(aggregate, reference, 0.0, 1.0, 2, torch.Generator())["w"], aggregate["w"])
        True
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier {noise_multiplier} must be >= 0")
    if not clipping_norm > 0:
        raise ValueError(f"clipping norm {clipping_norm} must be positive")
    if num_clients < 1:
        raise ValueError(f"number of clients {num_clients} must be >= 1")
    _check_same_keys(aggregate, reference, "aggregate")
    std = compute_stdv(noise_multiplier, clipping_norm, num_clients)
    if std == 0.0:
        return dict(aggregate)
    noised: State = {}
    for key in sorted(key for key, value in aggregate.items() if value.is_floating_point()):
        value = aggregate[key]
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64, device=generator.device)
        delta = _float64(value) - _float64(reference[key])
        noised[key] = (_float64(reference[key]) + delta + std * noise.cpu()).to(dtype=value.dtype, device=value.device)
    return {key: noised.get(key, value) for key, value in aggregate.items()}


def central_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """User-level ε after ``rounds`` rounds of the subsampled Gaussian mechanism, at ``delta``.

    Each round releases the mean of clipped updates plus ``N(0, (σ·C/m)²)``: a Gaussian
    mechanism with noise multiplier σ relative to the sensitivity ``C/m``, applied to a sample
    of clients at rate ``q = clients_per_round / num_clients``. Opacus' RDP accountant composes
    the history ``[(σ, q, rounds)]`` (as McMahan et al. 2018 did with the moments accountant).
    The amplification by subsampling assumes each client joins a round independently with
    probability ``q``; with ``q = 1`` there is none.

    Args:
        noise_multiplier: σ ≥ 0.
        sample_rate: q in (0, 1].
        rounds: Rounds completed, ≥ 0.
        delta: δ in (0, 1).

    Returns:
        ε (0 after no round; ``inf`` for σ = 0, where nothing is private).

    Raises:
        ValueError: On an argument outside its range.

    Example:
        >>> round(central_epsilon(1.0, 0.25, 8, 1e-5), 2)  # same numbers as one DP-SGD client's 8 steps
        6.25
        >>> central_epsilon(0.0, 0.25, 8, 1e-5)
        inf
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier {noise_multiplier} must be >= 0")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample rate {sample_rate} must be in (0, 1]")
    if rounds < 0:
        raise ValueError(f"rounds {rounds} must be >= 0")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta {delta} must be in (0, 1)")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    return compute_epsilon("rdp", [(noise_multiplier, sample_rate, rounds)], delta)


class CentralDP(AggregatorWrapper):
    """Central DP around an aggregator: every update clipped to ``C``, the uniform mean, noise.

    The round config tells clients to weigh 1 (secure aggregation then sums unit-weighted
    deltas) and, with ``clipping=client``, to clip their own update. Without secure aggregation
    the server clips each update again (idempotent for clients that clipped) and averages
    uniformly; under it the clients' clipped, unit-weighted mean delta is what arrives. Noise
    ``N(0, (σ·C/m)²)`` is then added and the inner aggregator's server update applied as usual
    (FedAvgM's momentum post-processes the noised mean, which DP permits).

    Args:
        inner: A linear aggregator (its aggregate is a mean of the updates).
        settings: ``privacy.central`` (``clipping``, ``clipping_norm``, ``noise_multiplier``, ``delta``).
        generator: The noise source; None seeds one from a secret (never from the run seed saved
            in config.yaml: whoever knows the seed could subtract the noise).

    Raises:
        ConfigError: If ``inner`` is not linear: robust rules have other sensitivities, not analysed here.
    """

    def __init__(self, inner: Aggregator, settings: Any, generator: torch.Generator | None = None) -> None:
        if not inner.linear:
            raise ConfigError(
                f"privacy.central.clipping needs a linear federation.strategy (fedavg, fedprox, fedavgm), not "
                f"{type(inner).__name__}: central DP's noise σ·C/m is calibrated to the uniform mean of clipped "
                "updates, and robust aggregation rules are not analysed with it (set privacy.central.clipping=none)"
            )
        super().__init__(inner)
        self.clipping = str(settings.clipping)
        self.clipping_norm = float(settings.clipping_norm)
        self.noise_multiplier = float(settings.noise_multiplier)
        self.delta = float(settings.delta)
        self.generator = generator or torch.Generator().manual_seed(secrets.randbits(63))

    def configure_round(self, server_round: int) -> dict[str, Any]:
        config = {**self.inner.configure_round(server_round), keys.UNIFORM_WEIGHTS: True}
        if self.clipping == "client":
            config[keys.CENTRAL_CLIPPING_NORM] = self.clipping_norm
        return config

    def aggregate(self, replies: RoundReplies, global_state: Mapping[str, torch.Tensor]) -> State:
        if replies.mean_delta is None:  # each update arrived: clip it here, weigh every client 1
            clipped = [
                clip_update(u.state, {k: global_state[k] for k in u.state}, self.clipping_norm)[0]
                for u in self.require_updates(replies)
            ]
            aggregated = uniform_mean(clipped)  # the linear inner aggregate with unit weights
        else:  # secure aggregation: the clients clipped, and their unit-weighted mean delta arrived
            aggregated = self.inner.aggregate(replies, global_state)
        reference = {k: global_state[k] for k in aggregated}
        return add_central_noise(
            aggregated, reference, self.noise_multiplier, self.clipping_norm, len(replies.updates), self.generator
        )

    def round_metrics(self, server_round: int, sample_rate: float) -> dict[str, float]:
        epsilon = central_epsilon(self.noise_multiplier, sample_rate, server_round, self.delta)
        return {**self.inner.round_metrics(server_round, sample_rate), keys.CENTRAL_EPSILON: epsilon}
