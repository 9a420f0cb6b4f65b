"""Scheduling policies, registered by name (``get_policy("ooco", perf, cfg)``).

Importing this package registers every policy, both as a scheduling policy (simulator, scheduler service)
and as a live placement policy of the same name (``duopool.core.placement.get_placement_policy``).
"""

from duopool.core.policies import dopd, hygen, online_priority, ooco, pd_static, tropical  # noqa: F401
from duopool.core.policies.base import (
    PolicyConfig,
    SchedulingPolicy,
    get_policy,
    policy_names,
    register_policy,
)

__all__ = ["PolicyConfig", "SchedulingPolicy", "get_policy", "policy_names", "register_policy"]
