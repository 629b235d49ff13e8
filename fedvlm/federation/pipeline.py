"""Builds a run's aggregation pipeline: the strategy, wrapped by what the config switches on.

``federation.strategy`` → :class:`~fedvlm.federation.secure.SecureAggregation` (when
``federation.secure_aggregation.enabled``) → :class:`~fedvlm.federation.central_dp.CentralDP`
(when ``privacy.central.clipping`` is not ``none``). Central DP is outermost: it adds its noise
to whatever aggregate the inner pipeline formed, plain or secure.
"""

from __future__ import annotations

from omegaconf import DictConfig

from fedvlm.federation.aggregation import Aggregator
from fedvlm.federation.central_dp import CentralDP
from fedvlm.federation.secure import SecureAggregation
from fedvlm.federation.strategies import strategies


def build_aggregator(cfg: DictConfig) -> Aggregator:
    """The aggregator of a run, from its resolved config.

    Example:
        >>> from fedvlm.config import load_config
        >>> cfg = load_config(None, ["federation.strategy={name: fedprox, mu: 0.1}",
        ...                          "federation.secure_aggregation.enabled=true",
        ...                          "privacy.central.clipping=client"])
        >>> pipeline = build_aggregator(cfg)
        >>> type(pipeline).__name__, type(pipeline.inner).__name__, type(pipeline.inner.inner).__name__
        ('CentralDP', 'SecureAggregation', 'FedProx')
        >>> sorted(pipeline.configure_round(1))
        ['central-clipping-norm', 'proximal-mu', 'uniform-weights']
    """
    aggregator = strategies.build(cfg.federation.strategy)
    if cfg.federation.secure_aggregation.enabled:
        aggregator = SecureAggregation(aggregator, cfg.federation.secure_aggregation)
    if cfg.privacy.central.clipping != "none":
        aggregator = CentralDP(aggregator, cfg.privacy.central)
    return aggregator


__all__ = ["build_aggregator"]
