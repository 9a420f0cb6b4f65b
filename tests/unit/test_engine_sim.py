"""The engine adapter interface, exercised through the SIMULATED engine (no servers)."""

import asyncio
import pathlib

import pytest

from duopool.worker.engines.base import EngineError, EngineRequest, KvLoad, Sampling
from duopool.worker.engines.sim import SIM_BLOCK_SIZE, SimEngine
from duopool.worker.engines.sim_plan import PlannedSimEngine

pytestmark = pytest.mark.unit

# the plain engine (vLLM-like batching) and the one whose steps are a research policy's step plans: the
# same request semantics (tokens, KV, limits, aborts)
ENGINES = {"plain": SimEngine, "hygen-plans": lambda d, **kw: PlannedSimEngine(d, "hygen", **kw),
           "ooco-plans": lambda d, **kw: PlannedSimEngine(d, "ooco", role="decode", **kw)}


async def run(engine, req):
    outs = [o async for o in engine.generate(req)]
    return [t for o in outs for t in o.token_ids], outs


@pytest.mark.parametrize("kind", ENGINES)
def test_split_prefill_decode_equals_one_engine_and_reuses_kv(tmp_path: pathlib.Path, kind):
    make = ENGINES[kind]

    async def main():
        a, b = make(str(tmp_path), speedup=1000.0), make(str(tmp_path), speedup=1000.0)
        await a.start(), await b.start()
        prompt = tuple(range(1, 41))  # 40 tokens: 2 full blocks
        whole, _ = await run(a, EngineRequest("w", prompt, max_tokens=8, sampling=Sampling(seed=3)))
        first, outs = await run(a, EngineRequest("p", prompt, max_tokens=1, sampling=Sampling(seed=3), kv_save="t1"))
        kv = outs[-1].kv
        assert kv.num_tokens == 2 * SIM_BLOCK_SIZE and pathlib.Path(kv.path).exists()
        rest, douts = await run(b, EngineRequest("d", prompt + tuple(first), max_tokens=7, sampling=Sampling(seed=3),
                                                 kv_load=KvLoad(kv.path, kv.num_tokens)))
        assert first + rest == whole
        assert douts[0].num_cached_tokens == 32
        assert douts[-1].finished and douts[-1].finish_reason == "length"
        # Corrupt one block: the decode engine refuses the KV and recomputes (cached 0), same tokens.
        with open(kv.path, "r+b") as f:
            f.seek(4096 + 10)
            f.write(b"\xff\xfe")
        rest2, douts2 = await run(b, EngineRequest("d2", prompt + tuple(first), max_tokens=7,
                                                   sampling=Sampling(seed=3), kv_load=KvLoad(kv.path, 32)))
        assert rest2 == rest and douts2[0].num_cached_tokens == 0
        assert a.load().kv_usage == 0 and b.load().running == 0
        await a.stop(), await b.stop()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ENGINES)
def test_context_limit_and_abort(tmp_path, kind):
    async def main():
        e = ENGINES[kind](str(tmp_path), max_model_len=64, speedup=0.01)  # slow steps: abort lands mid-way
        await e.start()
        with pytest.raises(EngineError) as err:
            await run(e, EngineRequest("x", tuple(range(60)), max_tokens=10))
        assert err.value.field == "max_tokens"
        task = asyncio.create_task(run(e, EngineRequest("y", (1, 2, 3), max_tokens=50)))
        await asyncio.sleep(0.05)
        assert await e.abort("y")
        tokens, outs = await asyncio.wait_for(task, 30)
        assert outs[-1].finish_reason == "abort" and len(tokens) < 50
        assert not await e.abort("y")
        await e.stop()

    asyncio.run(main())
