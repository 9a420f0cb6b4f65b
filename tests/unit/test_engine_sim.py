"""The engine adapter interface, exercised through the SIMULATED engine (no servers)."""

import asyncio
import pathlib

import pytest

from duopool.worker.engines.base import EngineError, EngineRequest, KvLoad, Sampling
from duopool.worker.engines.sim import SIM_BLOCK_BYTES, SIM_BLOCK_SIZE, SimEngine, sim_kv_blocks
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


@pytest.mark.parametrize("kind", ENGINES)
def test_abort_with_park_saves_the_whole_context_and_a_resume_loads_it(tmp_path, kind):
    """A request stopped with ``park`` saves the KV of its prompt and of the tokens it generated (every full
    block); a resume elsewhere with that KV computes only the tail and continues with exactly the tokens an
    uninterrupted run gives."""
    async def main():
        a, b = ENGINES[kind](str(tmp_path), speedup=50.0), ENGINES[kind](str(tmp_path), speedup=1000.0)
        await a.start(), await b.start()
        assert a.parks
        prompt = tuple(range(1, 60))  # 59 tokens
        whole, _ = await run(b, EngineRequest("w", prompt, max_tokens=40, sampling=Sampling(seed=5), offline=True))
        got, outs = [], []
        req = EngineRequest("p", prompt, max_tokens=40, sampling=Sampling(seed=5), offline=True)
        async for o in a.generate(req):
            outs.append(o)
            got += o.token_ids
            if len(got) >= 12 and not o.finished:
                await a.abort("p", park=True)
        end = outs[-1]
        assert end.finish_reason == "abort" and 12 <= len(got) < 40
        kv = end.kv
        context = len(prompt) + len(got) - 1  # the last token's KV was not computed yet
        assert kv is not None and kv.num_tokens == context // SIM_BLOCK_SIZE * SIM_BLOCK_SIZE
        rest, douts = await run(b, EngineRequest("r", prompt + tuple(got), max_tokens=40 - len(got),
                                                 sampling=Sampling(seed=5), offline=True,
                                                 kv_load=KvLoad(kv.path, kv.num_tokens)))
        assert douts[0].num_cached_tokens == kv.num_tokens
        assert got + rest == whole
        # an abort without park saves nothing
        async for o in a.generate(EngineRequest("q", prompt, max_tokens=40, offline=True)):
            if o.token_ids and not o.finished:
                await a.abort("q")
        assert o.finish_reason == "abort" and o.kv is None
        assert a.load().kv_usage == 0 and b.load().running == 0
        await a.stop(), await b.stop()

    asyncio.run(main())


def test_simulated_kv_is_a_function_of_each_token_and_its_position():
    ids = tuple(range(100, 100 + 5 * SIM_BLOCK_SIZE + 3))
    kv = sim_kv_blocks(ids, 5)
    assert kv.shape == (5, SIM_BLOCK_BYTES) and kv.dtype.name == "uint8"
    assert (sim_kv_blocks(ids, 5) == kv).all()  # deterministic: a decode can check what it loads
    assert (sim_kv_blocks(ids, 3) == kv[:3]).all()  # a prefix's blocks are the prefix of the blocks
    changed = list(ids)
    changed[2 * SIM_BLOCK_SIZE + 7] += 1
    differs = (sim_kv_blocks(tuple(changed), 5) != kv).any(axis=1)
    assert differs.tolist() == [False, False, True, False, False]
    swapped = ids[SIM_BLOCK_SIZE : 2 * SIM_BLOCK_SIZE] + ids[:SIM_BLOCK_SIZE] + ids[2 * SIM_BLOCK_SIZE :]
    assert (sim_kv_blocks(swapped, 2) != kv[:2]).any(axis=1).all()  # the same tokens elsewhere: other KV


@pytest.mark.parametrize("kind", ENGINES)
def test_offline_tokens_go_out_in_batches_and_none_is_lost_at_a_preemption(tmp_path, kind):
    """``offline_flush_s``: an offline request's tokens are put out at most that often (its first at once),
    an online request's every step; a request stopped meanwhile gets its held tokens with its end."""
    from tests.conftest import sim_expected_tokens

    async def main():
        e = ENGINES[kind](str(tmp_path), speedup=20.0, offline_flush_s=0.05)
        await e.start()
        prompt = tuple(range(5, 70))
        _, online = await run(e, EngineRequest("on", prompt, max_tokens=30, sampling=Sampling(seed=3)))
        tokens, offline = await run(e, EngineRequest("off", prompt, max_tokens=200, offline=True,
                                                     sampling=Sampling(seed=3)))
        got, n_out = [], 0
        async for o in e.generate(EngineRequest("cut", prompt, max_tokens=200, offline=True, sampling=Sampling(seed=3))):
            got += o.token_ids
            n_out += 1
            if n_out == 2:
                await asyncio.sleep(0.03)  # tokens are held meanwhile
                await e.abort("cut")
            end = o
        await e.stop()
        return online, tokens, offline, got, end

    online, tokens, offline, got, end = asyncio.run(main())
    assert [len(o.token_ids) for o in online] == [1] * 30
    want = sim_expected_tokens(list(range(5, 70)), 200, seed=3)
    assert tokens == want and len(offline[0].token_ids) == 1 and len(offline) < 100
    assert end.finish_reason == "abort" and len(end.token_ids) > 0  # the held tokens came with the end
    assert got == want[: len(got)]
