"""The SIMULATED engine whose steps are a scheduling policy's step plans (duopool.worker.engines.sim_plan):
in-engine preemption, the plan's budgets, and no work held by an idle engine."""

import asyncio

import pytest

from duopool.worker.engines.base import EngineRequest, Sampling
from duopool.worker.engines.sim import SimEngine
from duopool.worker.engines.sim_plan import PlannedSimEngine
from tests.conftest import sim_expected_tokens

pytestmark = pytest.mark.unit


async def collect(engine, req):
    outs = [o async for o in engine.generate(req)]
    return [t for o in outs for t in o.token_ids], outs[-1].finish_reason


def test_plans_preempt_offline_decodes_in_the_engine_and_keep_their_tokens_exact(tmp_path):
    """A TPOT SLO of 10 ms leaves HyGen a budget of 8 ms per step: a batch of long offline decodes breaks
    it, so the plan evicts the newest at the next step boundary — no RPC — and their streams end
    "preempted" after exactly the tokens an uninterrupted run starts with. An online request arriving in
    the middle runs to its end."""

    async def main():
        e = PlannedSimEngine(str(tmp_path), "hygen", tpot_slo_ms=10.0, max_model_len=8192, speedup=20.0)
        await e.start()
        prompts = {f"off{i}": tuple(range(i + 1, i + 3001)) for i in range(24)}
        tasks = {rid: asyncio.create_task(collect(e, EngineRequest(rid, p, max_tokens=64, offline=True,
                                                                   sampling=Sampling(seed=1))))
                 for rid, p in prompts.items()}
        await asyncio.sleep(0.2)
        online = await collect(e, EngineRequest("on", tuple(range(7, 207)), max_tokens=16, sampling=Sampling(seed=1)))
        results = {rid: await asyncio.wait_for(t, 60) for rid, t in tasks.items()}
        await e.stop()
        return e, online, results

    e, online, results = asyncio.run(main())
    assert online == (sim_expected_tokens(list(range(7, 207)), 16, seed=1), "length")
    reasons = [reason for _, reason in results.values()]
    assert reasons.count("preempted") > 0 and e.preempted_in_engine == reasons.count("preempted")
    for rid, (tokens, reason) in results.items():
        want = sim_expected_tokens(list(prompts_of(rid)), 64, seed=1)
        if reason == "length":
            assert tokens == want, rid
        else:
            assert reason == "preempted" and tokens == want[: len(tokens)], rid
    assert e.load().running == 0 and e.load().kv_usage == 0


def prompts_of(rid: str) -> range:
    i = int(rid[3:])
    return range(i + 1, i + 3001)


@pytest.mark.parametrize("planned", [True, False])
def test_the_plans_budget_holds_offline_prefill_back_while_online_decodes_run(tmp_path, planned):
    """HyGen fills a step with offline prefill only up to its latency budget (0.8 × TPOT = 40 ms, by its
    fitted predictor; the roofline the engine times steps with runs up to ~25% over it for long prompts),
    so an online request decoding beside six 8k-token offline prompts keeps its TPOT. The plain engine,
    batching like vLLM, gives them whole 8k-token chunks: 200 ms steps."""

    async def main():
        kw = dict(max_model_len=16384, speedup=4.0)
        e = PlannedSimEngine(str(tmp_path), "hygen", tpot_slo_ms=50.0, **kw) if planned else \
            SimEngine(str(tmp_path), **kw)
        seen: list[float] = []
        e.step_observer = lambda s: seen.append(s * 4.0 * 1e3)  # modeled ms (before the speedup)
        await e.start()
        online = asyncio.create_task(collect(e, EngineRequest("on", tuple(range(1, 101)), max_tokens=40)))
        await asyncio.sleep(0.02)
        off = [asyncio.create_task(collect(e, EngineRequest(f"o{i}", tuple(range(2, 8002)), max_tokens=4,
                                                            offline=True))) for i in range(6)]
        tokens, reason = await asyncio.wait_for(online, 60)
        n_online_steps = len(seen)
        await asyncio.wait_for(asyncio.gather(*off), 120)
        await e.stop()
        return tokens, reason, seen[:n_online_steps]

    tokens, reason, seen = asyncio.run(main())
    assert reason == "length" and len(tokens) == 40
    assert len(seen) >= 40 and sum(s > 20 for s in seen) >= 5, seen  # offline prefill ran beside it
    if planned:
        assert max(seen) <= 40.0 * 1.25, seen
    else:
        assert max(seen) > 150.0, seen


def test_an_idle_engine_runs_offline_work_its_plan_would_not_admit(tmp_path):
    """OOCO's strict decode instance admits no offline prefill in its plans; an offline request sent to
    such an engine anyway (a scheduler's view that differs) still runs, since the engine is idle."""

    async def main():
        e = PlannedSimEngine(str(tmp_path), "ooco", role="decode", speedup=1000.0)
        await e.start()
        got = await asyncio.wait_for(collect(e, EngineRequest("x", tuple(range(3, 40)), max_tokens=5, offline=True)), 10)
        await e.stop()
        return got

    assert asyncio.run(main()) == (sim_expected_tokens(list(range(3, 40)), 5), "length")


def test_a_busy_decode_instance_hands_back_an_offline_request_sent_without_its_kv(tmp_path, monkeypatch):
    """A decode continuation whose KV could not be loaded reaches OOCO's strict decode instance as a prompt
    its plan never admits; while online decodes keep the engine busy (never idle) it is handed back at once
    (stream ends "preempted", no token) instead of waiting forever or prefilling next to online decodes."""
    from duopool.worker.engines import sim_plan

    monkeypatch.setattr(sim_plan, "STRANDED_S", 0.05)

    async def main():
        e = PlannedSimEngine(str(tmp_path), "ooco", role="decode", speedup=1.0)
        await e.start()
        busy = asyncio.create_task(collect(e, EngineRequest("on", tuple(range(5, 50)), max_tokens=400)))
        await asyncio.sleep(0.1)
        got = await asyncio.wait_for(collect(e, EngineRequest("x", tuple(range(3, 40)), max_tokens=5, offline=True)), 10)
        still_busy = not busy.done()
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
        await e.stop()
        return got, still_busy, e.stranded

    got, still_busy, stranded = asyncio.run(main())
    assert got == ([], "preempted")
    assert still_busy and stranded == 1


def test_ooco_cuts_an_offline_step_short_for_an_online_arrival_and_loses_nothing(tmp_path):
    """OOCO's fast preemption, as the simulator's relaxed instances do it: an online prompt arriving during a
    long offline prefill step stops that step at its next layer boundary (the step's work is not applied and
    runs again later), so the online first token does not wait out the offline step. The offline request
    still produces exactly its tokens."""
    import time

    async def main():
        e = PlannedSimEngine(str(tmp_path), "ooco", role="prefill", max_model_len=16384)
        step_s = e.timer.chunked_step_s([(8192, 8192)], [])
        await e.start()
        off_prompt = tuple(range(3, 3 + 12000))
        off = asyncio.create_task(collect(e, EngineRequest("off", off_prompt, max_tokens=4, offline=True,
                                                           sampling=Sampling(seed=2))))
        await asyncio.sleep(step_s * 0.2)  # inside the first offline step
        t0 = time.perf_counter()
        gen = e.generate(EngineRequest("on", tuple(range(9, 209)), max_tokens=2, sampling=Sampling(seed=2)))
        first = await gen.__anext__()
        ttft = time.perf_counter() - t0
        rest = [o async for o in gen]
        off_result = await asyncio.wait_for(off, 60)
        await e.stop()
        return e, step_s, ttft, first.token_ids + [t for o in rest for t in o.token_ids], off_result, off_prompt

    e, step_s, ttft, online, off_result, off_prompt = asyncio.run(main())
    assert step_s > 0.2  # a long step: what an online prompt would wait for without the cut
    assert e.fast_preempted >= 1
    assert ttft < 0.5 * step_s, f"online TTFT {ttft * 1e3:.0f} ms against an offline step of {step_s * 1e3:.0f} ms"
    assert online == sim_expected_tokens(list(range(9, 209)), 2, seed=2)
    assert off_result == (sim_expected_tokens(list(off_prompt), 4, seed=2), "length")
