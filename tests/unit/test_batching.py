"""Merger: concurrent calls merged into batches that form when they can start."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from stageline.batching import BatchOverrides, Merger


class Recorder:
    """A batch function that records each batch and holds it until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await self.release.wait()
        return [i * 10 for i in items]


class Echo:
    """A batch function that records each batch and answers it after ``delay_s``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay_s)
        return items


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_requests_that_arrive_while_a_batch_runs_form_the_next_batch_together() -> None:
    async def main() -> None:
        run = Recorder()
        merger = Merger(run, max_size=64)
        first = asyncio.create_task(merger(1))
        await settle()
        assert run.batches == [[1]]  # a lone request starts at once
        later = [asyncio.create_task(merger(i)) for i in range(2, 7)]
        await settle()
        assert run.batches == [[1]]  # the others wait for the running batch
        run.release.set()
        assert await first == 10
        assert await asyncio.gather(*later) == [20, 30, 40, 50, 60]
        assert run.batches == [[1], [2, 3, 4, 5, 6]]  # one batch, not five of one

    asyncio.run(main())


def test_batches_respect_max_size_and_in_flight() -> None:
    async def main() -> None:
        run = Recorder()
        merger = Merger(run, max_size=3, in_flight=2)
        tasks = [asyncio.create_task(merger(i)) for i in range(8)]
        await settle()
        assert run.batches == [[0, 1, 2], [3, 4, 5]]  # two in flight, three each
        merger.configure(BatchOverrides(max_size=1))
        run.release.set()
        assert await asyncio.gather(*tasks) == [i * 10 for i in range(8)]
        assert run.batches[2:] == [[6], [7]]

    asyncio.run(main())


def test_a_second_batch_goes_beside_the_running_one_only_when_it_is_full() -> None:
    async def main() -> None:
        run = Recorder()
        merger = Merger(run, max_size=4, in_flight=2)
        tasks = [asyncio.create_task(merger(0))]
        await settle()
        tasks += [asyncio.create_task(merger(i)) for i in (1, 2)]
        await settle()
        assert run.batches == [[0]]  # two waiting: they wait for the next batch, together
        tasks += [asyncio.create_task(merger(i)) for i in (3, 4)]
        await settle()
        assert run.batches == [[0], [1, 2, 3, 4]]  # a full batch goes at once
        tasks.append(asyncio.create_task(merger(5)))
        await settle()
        run.release.set()
        assert await asyncio.gather(*tasks) == [i * 10 for i in range(6)]
        assert run.batches == [[0], [1, 2, 3, 4], [5]]  # and the rest when one ends

    asyncio.run(main())


def test_with_a_weight_a_few_heavy_callers_fill_a_batch() -> None:
    async def main() -> None:
        run = Recorder()
        merger = Merger(run, max_size=10, in_flight=2, weight=lambda item: item)
        tasks = [asyncio.create_task(merger(1))]
        await settle()
        tasks.append(asyncio.create_task(merger(4)))
        await settle()
        assert run.batches == [[1]]  # weight 4 waiting: not a full batch
        tasks.append(asyncio.create_task(merger(6)))
        await settle()
        assert run.batches == [[1], [4, 6]]  # weight 10: it goes beside the first
        run.release.set()
        assert await asyncio.gather(*tasks) == [10, 40, 60]

    asyncio.run(main())


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_runs() -> None:
    async def main() -> None:
        calls: list[list[str]] = []

        async def run(items: list[str]) -> list[str]:
            calls.append(items)
            await asyncio.sleep(0.01)
            if "bad" in items:
                raise ValueError("stage failed")
            return items

        merger: Merger[str, str] = Merger(run, max_size=8)
        first = asyncio.create_task(merger("a"))
        await settle()
        bad = [asyncio.create_task(merger(x)) for x in ("b", "bad")]
        results = await asyncio.gather(first, *bad, return_exceptions=True)
        assert results[0] == "a"
        assert [type(r) for r in results[1:]] == [ValueError, ValueError]
        assert await merger("c") == "c"
        assert calls == [["a"], ["b", "bad"], ["c"]]

    asyncio.run(main())


def test_a_caller_that_gave_up_is_left_out_of_the_batch() -> None:
    async def main() -> None:
        run = Recorder()
        merger = Merger(run, max_size=8)
        first = asyncio.create_task(merger(1))
        await settle()
        gone = asyncio.create_task(merger(2))
        kept = asyncio.create_task(merger(3))
        await settle()
        gone.cancel()
        await settle()
        run.release.set()
        assert (await first, await kept) == (10, 30)
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert run.batches == [[1], [3]]

    asyncio.run(main())


def test_wait_ms_lets_a_batch_gather_more_requests() -> None:
    async def main() -> None:
        run = Echo()
        merger = Merger(run, max_size=8, wait_ms=50)
        first = asyncio.create_task(merger(1))
        await asyncio.sleep(0.005)
        assert list(await asyncio.gather(first, merger(2))) == [1, 2]
        assert run.batches == [[1, 2]]

    asyncio.run(main())


def test_callers_answered_together_come_back_into_one_batch_with_regroup_ms() -> None:
    """A closed loop: four callers answered by one batch return a few ms apart. Without
    regrouping the first of them runs alone and the other three wait for it."""

    async def main(regroup_ms: float) -> list[list[int]]:
        run = Echo(delay_s=0.02)
        merger = Merger(run, max_size=8, regroup_ms=regroup_ms)

        async def client(i: int) -> None:
            for _ in range(3):
                await merger(i)
                await asyncio.sleep(0.002 * i)  # answered together, back staggered

        await asyncio.gather(*(client(i) for i in range(4)))
        return run.batches

    assert asyncio.run(main(regroup_ms=50)) == [[0, 1, 2, 3]] * 3
    split = asyncio.run(main(regroup_ms=0))
    assert split[1] == [0]  # the first back runs alone; the rest queue behind it
    assert len(split) > 3


def test_regroup_never_holds_a_caller_alone_and_gives_up_after_regroup_ms() -> None:
    async def main() -> None:
        run = Recorder()
        run.release.set()
        merger = Merger(run, max_size=8, regroup_ms=10_000)
        assert await merger(1) == 10
        started = asyncio.get_running_loop().time()
        assert await merger(2) == 20  # the last batch was one: no wait at all
        assert asyncio.get_running_loop().time() - started < 1

        merger.configure(BatchOverrides(regroup_ms=30))
        assert await asyncio.gather(*(merger(i) for i in range(3))) == [0, 10, 20]
        started = asyncio.get_running_loop().time()
        assert await merger(4) == 40  # one of three came back: runs after 30 ms
        assert asyncio.get_running_loop().time() - started >= 0.03
        assert run.batches[-2:] == [[0, 1, 2], [4]]

    asyncio.run(main())


def test_batch_overrides_name_a_misspelt_option() -> None:
    given = BatchOverrides.model_validate({"max_size": 4, "regroup_ms": 0})
    assert given.model_dump(exclude_none=True) == {"max_size": 4, "regroup_ms": 0}
    with pytest.raises(ValidationError, match=r"max_sise\n  Extra inputs are not permitted"):
        BatchOverrides.model_validate({"max_sise": 4})
