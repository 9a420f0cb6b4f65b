"""Scheduling policies, registered by name (``get_policy("ooco", perf, cfg)``).

Importing this package registers every policy by name. The simulator and the scheduler service run each one
through the decision core (``duopool.core.brain``); ``least-loaded`` (``duopool.core.placement``) is the
one rule outside it.
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
