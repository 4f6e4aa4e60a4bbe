"""SendSlots: a stalled writer gives its slot back, but only so many may stall at once."""

import asyncio

from meshplane.controlplane.server import SendSlots


async def test_stalled_writers_give_their_slot_back_up_to_the_limit() -> None:
    slots = SendSlots(1, stall=0.05, max_stalled=1)
    release = {name: asyncio.Event() for name in "abc"}
    entered: list[str] = []

    async def writer(name: str) -> None:
        async with slots.hold():
            entered.append(name)
            await release[name].wait()  # a write its peer does not take

    tasks = [asyncio.create_task(writer(name)) for name in "abc"]
    await asyncio.sleep(0.3)
    # a stalled and gave its slot to b; b stalled too, but one stalled writer is the limit: c waits.
    assert entered == ["a", "b"] and slots.stalled == 1
    release["a"].set()
    await asyncio.sleep(0.3)
    assert entered == ["a", "b", "c"]  # a done: b may count as stalled now, and c gets the slot
    for event in release.values():
        event.set()
    await asyncio.gather(*tasks)
    assert slots.stalled == 0
