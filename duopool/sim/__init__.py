"""Offline cluster simulator: discrete-event, virtual clock, the same policy objects as the scheduler."""

from duopool.sim.engine import SimConfig, SimResult, Simulator
from duopool.sim.metrics import summarize

__all__ = ["SimConfig", "SimResult", "Simulator", "summarize", "run_sim"]


def run_sim(cfg: SimConfig, online, offline, progress=None) -> tuple[SimResult, dict]:
    """Run one simulation and return the result and its summary."""
    res = Simulator(cfg, online, offline, progress=progress).run()
    return res, summarize(res)
