"""UploadSlots (agent/peer_server.py): how many pieces leave an agent at once, and who is next."""

from __future__ import annotations

import trio
import trio.testing

from agent.peer_server import UploadSlots
from p2preg.digest import Digest
from p2preg.swarm_limits import (
    SMALL_SWARM_PEERS,
    SMALL_SWARM_UPLOAD_SLOTS,
    UPLOAD_SLOTS,
    upload_slots,
)
from p2preg.upload_order import upload_rank

D = Digest.parse("sha256:" + "ab" * 32)


async def test_at_most_n_at_once_and_least_sent_piece_next() -> None:
    slots = UploadSlots(2)
    slots.sent[(D, 7)] = 3  # piece 7 already went out three times, piece 9 never
    order: list[int] = []
    done = {index: trio.Event() for index in (1, 2, 7, 9)}
    active = 0
    peak = 0

    async def send(index: int) -> None:
        nonlocal active, peak
        async with slots.slot((D, index)):
            active += 1
            peak = max(peak, active)
            order.append(index)
            await done[index].wait()
            active -= 1

    async with trio.open_nursery() as nursery:
        for index in (1, 2, 7, 9):  # 1 and 2 take the two slots; 7 (first) and 9 wait
            nursery.start_soon(send, index)
            await trio.testing.wait_all_tasks_blocked()
        assert order == [1, 2] and active == 2
        done[1].set()  # one slot frees: the piece never sent goes first, though 7 came first
        await trio.testing.wait_all_tasks_blocked()
        assert order == [1, 2, 9]
        done[2].set()
        await trio.testing.wait_all_tasks_blocked()
        assert order == [1, 2, 9, 7]
        done[7].set()
        done[9].set()
    assert peak == 2


async def test_a_cancelled_waiter_gives_up_its_place_without_leaking_a_slot() -> None:
    slots = UploadSlots(1)
    got: list[int] = []
    hold = trio.Event()

    async def send(index: int) -> None:
        async with slots.slot((D, index)):
            got.append(index)
            await hold.wait()

    gives_up = trio.CancelScope()

    async def impatient() -> None:
        with gives_up:
            await send(2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, 1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(impatient)
        await trio.testing.wait_all_tasks_blocked()
        gives_up.cancel()  # 2 leaves the queue before it got the slot
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(send, 3)
        await trio.testing.wait_all_tasks_blocked()
        hold.set()
    assert got == [1, 3]
    with trio.fail_after(1):  # the one slot is free again
        async with slots.slot((D, 4)):
            pass


# -- sized by the swarm (p2preg.swarm_limits) ---------------------------------------------------


def test_policy_small_swarms_send_more_at_once() -> None:
    assert upload_slots(None) == UPLOAD_SLOTS
    assert upload_slots(0) == upload_slots(SMALL_SWARM_PEERS) == SMALL_SWARM_UPLOAD_SLOTS
    assert upload_slots(SMALL_SWARM_PEERS + 1) == upload_slots(50) == UPLOAD_SLOTS


async def test_resizing_up_lets_waiting_sends_start_and_down_lets_running_ones_finish() -> None:
    slots = UploadSlots(1)
    running: list[int] = []
    finish = {index: trio.Event() for index in range(5)}

    async def send(index: int) -> None:
        async with slots.slot((D, index)):
            running.append(index)
            await finish[index].wait()
            running.remove(index)

    async with trio.open_nursery() as nursery:
        for index in range(5):
            nursery.start_soon(send, index)
            await trio.testing.wait_all_tasks_blocked()
        assert len(running) == 1
        slots.resize(3)  # two waiting sends start at once
        await trio.testing.wait_all_tasks_blocked()
        assert len(running) == 3
        slots.resize(1)  # nothing is interrupted, and nothing new starts until one runs
        for index in list(running)[:2]:
            finish[index].set()
            await trio.testing.wait_all_tasks_blocked()
            assert len(running) < 3 and not (set(running) & {3, 4})
        finish[running[0]].set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(running) == 1 and running[0] in (3, 4)  # one at a time again
        for event in finish.values():
            event.set()
    assert slots.limit == 1


# -- who is next: p2preg.upload_order -----------------------------------------------------------


async def _grant_order(waiters: list[tuple[int, int]]) -> list[int]:
    """Pieces in the order one busy slot serves the ``waiters`` ((piece, requester's pieces held),
    queued in this order); piece 0 holds the slot first."""
    slots = UploadSlots(1)
    held = {index: count for index, count in waiters}
    order: list[int] = []
    release = trio.Event()

    async def send(index: int) -> None:
        async with slots.slot((D, index), lambda: held[index]):
            order.append(index)
            if index == 0:
                await release.wait()

    async with trio.open_nursery() as nursery:
        held[0] = 0
        nursery.start_soon(send, 0)
        await trio.testing.wait_all_tasks_blocked()
        for index, _ in waiters:
            nursery.start_soon(send, index)
            await trio.testing.wait_all_tasks_blocked()
        held[3] = 1  # the requester told us it got more pieces while it waited
        release.set()
    return order[1:]


async def test_the_requester_holding_fewest_pieces_goes_next_among_equally_sent_pieces() -> None:
    waiters = [(1, 40), (2, 30), (3, 50), (4, 5)]  # (piece, pieces its requester holds)
    # Its latest count counts: 3's requester told us 1 just before the slot freed.
    assert await _grant_order(waiters) == [3, 4, 2, 1]
    # Equal counts: the longest waiting goes first (3's requester told us 1 meanwhile).
    assert await _grant_order([(1, 7), (2, 7), (3, 7), (4, 7)]) == [3, 1, 2, 4]


async def test_a_piece_sent_less_often_still_goes_before_a_needier_requester() -> None:
    slots = UploadSlots(1)
    slots.sent[(D, 1)] = 2
    order: list[int] = []
    release = trio.Event()

    async def send(index: int, held: int) -> None:
        async with slots.slot((D, index), lambda: held):
            order.append(index)
            if index == 0:
                await release.wait()

    async with trio.open_nursery() as nursery:
        for index, held in ((0, 0), (1, 0), (2, 90)):
            nursery.start_soon(send, index, held)
            await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert order == [0, 2, 1]


def test_policy_least_sent_then_fewest_held_in_swarms_of_any_size() -> None:
    assert upload_rank(0, 500) < upload_rank(1, 0)  # least sent first
    assert upload_rank(1, 3) < upload_rank(1, 4)  # then the requester holding fewest
