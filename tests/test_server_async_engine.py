"""AsyncEngine: the engine's step loop on its own thread, driven from asyncio."""
from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from pagedserve.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestFailedError
from pagedserve.engine import LLMEngine
from pagedserve.llm import LLM, merge_output
from pagedserve.sampling_params import SamplingParams

OPTIONS = dict(num_kv_blocks=128, block_size=8, dtype="float32")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@contextlib.contextmanager
def started(model_dir: str, max_waiting: int | None = None, **options):
    engine = AsyncEngine(LLMEngine(model=model_dir, **{**OPTIONS, **options}), max_waiting=max_waiting)
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown()


async def settle(engine: AsyncEngine, timeout: float = 5.0) -> dict:
    """The engine's stats once nothing runs or waits and no block is used."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if (s["num_requests_running"] == s["num_requests_waiting"] == s["kv_blocks_used"] == 0
                or time.monotonic() > deadline):
            return s
        await asyncio.sleep(0.01)


def test_generate_matches_offline_llm(tiny_model_dir):
    prompts = ["The quick brown fox", "Hello world! How are you", "Paged attention"]
    params = SamplingParams(n=2, max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = LLM(model=tiny_model_dir, **OPTIONS).generate(prompts, params, use_tqdm=False)

    async def one(engine, i, prompt):
        acc, deltas = None, 0
        async for delta in engine.generate(prompt, params, f"r{i}"):
            acc, deltas = merge_output(acc, delta), deltas + 1
        return acc, deltas

    async def main(engine):
        return await asyncio.gather(*(one(engine, i, p) for i, p in enumerate(prompts)))

    with started(tiny_model_dir) as engine:
        results = asyncio.run(main(engine))
    for (got, deltas), want in zip(results, expected):
        assert deltas > 1  # streamed, not one lump
        assert got.finished and [o.token_ids for o in got.outputs] == [o.token_ids for o in want.outputs]
        assert [o.text for o in got.outputs] == [o.text for o in want.outputs]


def test_validation_errors_reach_the_caller(tiny_model_dir):
    async def main(engine):
        with pytest.raises(ValueError, match="maximum context length is 256"):
            await engine.add_request("hello", SamplingParams(max_tokens=1000), "too-long")
        with pytest.raises(ValueError, match="token ids"):
            async for _ in engine.generate([1, 2, 10**6], GREEDY, "bad-ids"):
                pass
        # the loop is still serving
        outs = [d async for d in engine.generate("hello", GREEDY, "fine")]
        assert outs[-1].finished

    with started(tiny_model_dir) as engine:
        asyncio.run(main(engine))


def test_leaving_early_aborts_and_frees_blocks(tiny_model_dir):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main(engine):
        # stop iterating: the generator's close aborts the request
        gen = engine.generate("Hello world", params, "left")
        async for delta in gen:
            break
        await gen.aclose()
        s = await settle(engine)
        assert s["kv_blocks_used"] == 0 and s["num_requests_running"] == 0
        # cancel a task that consumes a stream
        task = asyncio.create_task(anext_all(engine.generate("Hello world", params, "cancelled")))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        s = await settle(engine)
        assert s["kv_blocks_used"] == 0 and s["num_requests_running"] == 0
        assert s["generation_tokens"] < 2 * 200  # neither ran to the end

    async def anext_all(gen):
        async for _ in gen:
            pass

    with started(tiny_model_dir) as engine:
        asyncio.run(main(engine))


def test_queue_full(tiny_model_dir):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main(engine):
        running = await engine.add_request("one", params, "a")
        await running.__anext__()  # it runs: the only seat (max_num_seqs=1)
        waiting = await engine.add_request("two", params, "b")
        with pytest.raises(QueueFullError, match="max-waiting 1"):
            await engine.add_request("three", params, "c")
        running.abort()
        waiting.abort()
        await settle(engine)
        third = await engine.add_request("three", GREEDY, "c")
        assert [d async for d in third][-1].finished

    with started(tiny_model_dir, max_waiting=1, max_num_seqs=1) as engine:
        asyncio.run(main(engine))


def test_idle_loop_sleeps(tiny_model_dir):
    with started(tiny_model_dir) as engine:
        asyncio.run(_drain(engine.generate("warm up", GREEDY, "w")))
        cpu = time.process_time()
        time.sleep(0.5)
        assert time.process_time() - cpu < 0.1  # a spinning loop would burn ~0.5 s of CPU here


async def _drain(gen):
    return [d async for d in gen]


def test_a_failing_step_fails_its_requests_not_the_server(tiny_model_dir):
    """A fault inside the model fails the request of that step only; a request waiting meanwhile
    (max_num_seqs=1) gets its solo tokens, and new requests are served."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = LLM(model=tiny_model_dir, **OPTIONS).generate(["Bystander"], params, use_tqdm=False)[0]
    with started(tiny_model_dir, max_num_seqs=1) as engine:
        calls = {"n": 0}

        def fault(*_):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected failure")

        runner = engine.engine.runner
        execute = runner.execute
        runner.execute = lambda sched: fault() or execute(sched)  # the step fails in the model

        async def main():
            victim = await engine.add_request("Hello", params, "victim")
            bystander = await engine.add_request("Bystander", params, "bystander")
            with pytest.raises(RequestFailedError, match="injected failure"):
                async for _ in victim:
                    pass
            acc = None
            async for delta in bystander:
                acc = merge_output(acc, delta)
            assert acc.outputs[0].token_ids == want.outputs[0].token_ids
            s = await settle(engine)
            assert s["kv_blocks_used"] == 0
            outs = await _drain(engine.generate("Hello", params, "after"))
            assert outs[-1].finished and engine.is_running

        asyncio.run(main())


def test_a_failure_outside_any_step_fails_the_live_requests_and_goes_on(tiny_model_dir, monkeypatch):
    with started(tiny_model_dir) as engine:
        real_schedule = engine.engine.scheduler.schedule
        calls = {"n": 0}

        def flaky_schedule():
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected failure")
            return real_schedule()

        monkeypatch.setattr(engine.engine.scheduler, "schedule", flaky_schedule)

        async def main():
            with pytest.raises(RequestFailedError, match="injected failure"):
                await _drain(engine.generate("Hello", GREEDY, "victim"))
            s = await settle(engine)
            assert s["kv_blocks_used"] == 0
            outs = await _drain(engine.generate("Hello", GREEDY, "after"))
            assert outs[-1].finished and engine.is_running

        asyncio.run(main())


def test_shutdown_ends_open_streams(tiny_model_dir):
    engine = AsyncEngine(LLMEngine(model=tiny_model_dir, **OPTIONS))
    engine.start()
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        stream = await engine.add_request("Hello", params, "open")
        await stream.__anext__()
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.add_request("Hello", params, "late")

    asyncio.run(main())
    assert not engine.is_running
