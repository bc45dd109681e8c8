"""The Ray runtime: the server's bookkeeping (no Ray), then real launches on a local Ray.

The first part drives :class:`ShardServer` with ``asyncio`` directly: sharding, exactly-once
delivery, grants, SSGD rounds, imposed orders, lags, epoch ends. The second part (marked
``ray``) starts one local Ray instance for the session and launches real runs on a
Fashion-MNIST subset: equivalence with the simulator, resume, every algorithm, faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import math
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import dana
from dana.errors import DanaError
from dana.rules import ALGORITHMS
from dana.rules.mitigations import _Lagged
from dana.runtime import MODEL, Fault, driver, launch, require_ray, transport
from dana.runtime.server import Order, ShardServer, ShardSpec, checkpointable, shard_bounds
from dana.training import LRSchedule, RunConfig, preset_config
from dana.training.run import CHECKPOINT, RESULT, build_trainer

# --- the server without Ray -------------------------------------------------------------

P = 23  # parameters of the toy master (not divisible by the shard counts used)
LAGGED = ["dc-asgd", "dc-asgd-a", "sa-asgd", "gap-aware", "delay-adaptive", "dana-dc"]


def spec(
    k: int = 0,
    shards: int = 1,
    *,
    algorithm: str = "dana-zero",
    workers: int = 3,
    steps_per_epoch: int = 4,
    epochs: int = 3,
    order: Order | None = None,
) -> ShardSpec:
    schedule = LRSchedule(0.1, workers, steps_per_epoch, (2,), 10.0, warmup_epochs=1.0)
    return ShardSpec(
        k,
        shard_bounds(P, shards)[k],
        algorithm,
        0.9,
        1e-3,
        workers,
        schedule,
        steps_per_epoch,
        epochs,
        order,
    )


def servers(shards: int, **options: Any) -> list[ShardServer]:
    params = torch.linspace(-1, 1, P).numpy()
    buffers = [np.zeros(2, np.float32)]
    out = []
    for k, (lo, hi) in enumerate(shard_bounds(P, shards)):
        s = spec(k, shards, **options)
        out.append(ShardServer(s, params=params[lo:hi], buffers=buffers if k == 0 else None))
    return out


async def push_all(
    shards: list[ShardServer],
    worker: int,
    seq: int,
    stamp: int,
    message: np.ndarray,
    loss: float = 1.0,
) -> list[Any]:
    """Push ``message`` to every shard, as a worker does (each shard gets its slice)."""
    calls = [
        s.push(
            worker,
            seq,
            stamp,
            message[slice(*s.spec.bounds)],
            loss,
            [np.full(2, seq, np.float32)] if s.spec.coordinator else None,
        )
        for s in shards
    ]
    return await asyncio.gather(*calls)


async def join_all(server: ShardServer) -> list[Any]:
    """Every worker joins (the first joins wait for one another)."""
    return await asyncio.gather(*(server.join(w) for w in range(server.spec.workers)))


def messages(n: int, seed: int = 0) -> list[np.ndarray]:
    gen = np.random.default_rng(seed)
    return [gen.standard_normal(P).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != "baseline"])
def test_shards_of_the_flat_buffer_update_exactly_as_the_whole(algorithm):
    # The same messages in the same order: K = 3 shards hold, slice by slice, exactly
    # what one server holds, and reply exactly the same parameters (every rule is
    # elementwise, SSGD's rounds and DANA-Zero's running sum included).
    order = [0, 2, 1, 1, 0, 2, 2, 0, 1, 0, 1, 2]  # each worker once per 3: valid for ssgd

    async def run(shards: list[ShardServer]) -> tuple[np.ndarray, list[np.ndarray]]:
        shards[0].granted = [4, 4, 4]  # grants are tested below; here: the arithmetic
        seqs, stamps, tasks = [0, 0, 0], [0, 0, 0], []
        for worker, message in zip(order, messages(len(order)), strict=True):
            tasks.append(
                asyncio.ensure_future(
                    push_all(shards, worker, seqs[worker], stamps[worker], message)
                )
            )
            seqs[worker] += 1
            await asyncio.sleep(0)  # let it be applied now (an ssgd push then waits)
        replies = []
        for task in tasks:
            done = await task
            replies.append(np.concatenate([r.params for r in done]))
        params = np.concatenate([s.rule.params(s.master).numpy() for s in shards])
        return params, replies

    whole, whole_replies = asyncio.run(run(servers(1, algorithm=algorithm)))
    parts, parts_replies = asyncio.run(run(servers(3, algorithm=algorithm)))
    assert not np.array_equal(whole, torch.linspace(-1, 1, P).numpy())  # it did train
    np.testing.assert_array_equal(parts, whole)
    for a, b in zip(parts_replies, whole_replies, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("algorithm", LAGGED)
def test_the_rules_tau_is_the_servers_lag_and_their_state_resumes_exactly(algorithm):
    # A free run's arrival order on K = 2 shards: the τ each shard's rule counts is the lag
    # the server measures from the stamps; a restart from the shards' checkpointed states
    # after 6 of 12 updates (sent θᵢ, τ counters, moments included) ends exactly as the
    # uninterrupted run.
    arrivals = [0, 0, 1, 0, 2, 2, 0, 1, 1, 2, 0, 2]
    pushes = list(zip(arrivals, messages(12, seed=4), strict=True))

    async def run(shards, pushes, track):
        shards[0].granted = [arrivals.count(w) for w in range(3)]
        lags, taus = [], []
        for w, message in pushes:
            lags.append(shards[0].updates - track["stamps"][w])
            taus.append([_Lagged.lag(shard.master, w) for shard in shards])
            reply = (await push_all(shards, w, track["seqs"][w], track["stamps"][w], message))[0]
            track["stamps"][w], track["seqs"][w] = reply.stamp, track["seqs"][w] + 1
        return lags, taus

    def fresh_track():
        return {"stamps": [0, 0, 0], "seqs": [0, 0, 0]}

    whole = servers(2, algorithm=algorithm)
    lags, taus = asyncio.run(run(whole, pushes, fresh_track()))
    assert max(lags) >= 3
    assert taus == [[lag, lag] for lag in lags]
    first, track = servers(2, algorithm=algorithm), fresh_track()
    asyncio.run(run(first, pushes[:6], track))
    states = checkpointable([s.state() for s in first])
    resumed = [ShardServer(s.spec, state=state) for s, state in zip(first, states, strict=True)]
    asyncio.run(run(resumed, pushes[6:], track))
    for a, b in zip(resumed, whole, strict=True):
        np.testing.assert_array_equal(
            a.rule.params(a.master).numpy(), b.rule.params(b.master).numpy()
        )
        assert a.master.replies == b.master.replies == 12


def test_a_retried_message_is_applied_once_and_a_lost_one_is_an_error():
    async def run() -> None:
        [server] = servers(1, workers=2)
        await join_all(server)
        m0, m1 = messages(2)
        first = await server.push(0, 0, 0, m0, 1.0)
        assert server.master.applied == [1, 0] and server.count == 1
        params = server.master.params.clone()
        retry = await server.push(0, 0, 0, m1, 1.0)  # the same seq again: not applied
        assert server.duplicates == 1 and server.master.applied == [1, 0]
        assert torch.equal(server.master.params, params)
        assert retry.applied == first.applied == 1
        with pytest.raises(RuntimeError, match="message 2 but 1 were applied: a message was lost"):
            await server.push(0, 2, 1, m1, 1.0)  # message 1 never arrived

    asyncio.run(run())


def test_grants_stop_the_workers_at_exactly_the_budget():
    # 2 workers, 3 epochs of 4 gradients: whoever is faster, the server applies exactly
    # 12 messages, counts them per worker, and refuses a message it did not grant.
    async def run() -> ShardServer:
        [server] = servers(1, workers=2)
        go = {w: reply.go for w, reply in enumerate(await join_all(server))}
        seq, stamp = [0, 0], [0, 0]
        turn = [0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 1]  # worker 0 is faster
        for w in turn:
            if go[w]:
                reply = await server.push(w, seq[w], stamp[w], messages(1, seq[w])[0], 1.0)
                go[w], stamp[w], seq[w] = reply.go, reply.stamp, seq[w] + 1
        assert not any(go.values())
        with pytest.raises(RuntimeError, match="without a grant"):
            await server.push(0, seq[0], stamp[0], messages(1)[0], 1.0)
        return server

    server = asyncio.run(run())
    assert server.count == 12 and sum(server.master.applied) == 12
    assert server.master.applied == server.granted == [9, 3]


def test_ssgd_answers_a_round_only_when_every_worker_has_sent():
    async def run() -> None:
        [server] = servers(1, algorithm="ssgd", workers=2)
        m0, m1 = messages(2)
        assert all(reply.go for reply in await join_all(server))
        first = asyncio.ensure_future(server.push(0, 0, 0, m0, 1.0))
        await asyncio.sleep(0)
        assert not first.done() and server.count == 1 and server.updates == 0
        # A restarted worker 0 joining now waits for the round it is part of.
        rejoin = asyncio.ensure_future(server.join(0))
        await asyncio.sleep(0)
        assert not rejoin.done()
        second = await server.push(1, 0, 0, m1, 1.0)
        reply, joined = await first, await rejoin
        assert server.updates == 1
        assert reply.params is second.params is joined.params and reply.stamp == 1

    asyncio.run(run())


def test_an_imposed_order_is_followed_whatever_the_arrival_order():
    order = Order("block-random", 3, seed=5, batch_size=8, synchronous=False)
    turns = order.turns(12)
    applied: list[int] = []

    async def run() -> None:
        [server] = servers(1, workers=3, order=order)
        step = server.rule.master_step

        def logged(state, message, worker, lr):
            applied.append(worker)
            return step(state, message, worker, lr)

        server.rule.master_step = logged

        async def worker(w: int) -> None:
            reply = await server.join(w)
            seq = 0
            while reply.go:
                reply = await server.push(w, seq, reply.stamp, messages(1, seq)[0], 1.0)
                seq += 1

        # Workers start in reverse order: the server still applies the scheduler's order.
        await asyncio.gather(*(worker(w) for w in (2, 1, 0)))

    asyncio.run(run())
    assert applied == turns
    assert sorted(set(turns)) == [0, 1, 2]


def test_lags_and_epoch_records_are_the_simulators_under_round_robin():
    # SPEC: with round-robin, the first N lags are 0, 1, …, N−1, then N−1.
    order = Order("round-robin", 3, seed=0, batch_size=8, synchronous=False)

    async def run() -> tuple[ShardServer, list[dict[str, Any]]]:
        [server] = servers(1, workers=3, order=order, steps_per_epoch=4, epochs=2)
        stamps = {w: reply.stamp for w, reply in enumerate(await join_all(server))}
        for c in range(8):
            w = c % 3
            reply = await server.push(
                w, c // 3, stamps[w], messages(1, c)[0], float(c), [np.full(2, c, np.float32)]
            )
            stamps[w] = reply.stamp
        return server, [await server.wait_epoch(e) for e in (1, 2)]

    server, records = asyncio.run(run())
    assert server.lags == {0: 1, 1: 1, 2: 6}
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["train_loss"] for r in records] == [1.5, 5.5]  # mean of the losses 0..3, 4..7
    assert [r["lag_mean"] for r in records] == [(0 + 1 + 2 + 2) / 4, 2.0]
    assert records[1]["lr"] == server.spec.schedule(7)
    # The last writer's BatchNorm statistics go with the snapshot (update 7, worker 1).
    part, state = asyncio.run(server.take_snapshot(2))
    np.testing.assert_array_equal(part["buffers"][0], np.full(2, 7, np.float32))
    assert state["last_writer"] == 1
    np.testing.assert_array_equal(part["params"], server.master.params.numpy())
    assert state["count"] == 8 and state["master"]["applied"] == [3, 3, 2]


def test_a_non_finite_loss_stops_the_run():
    async def run() -> tuple[dict[str, Any], Any]:
        [server] = servers(1, workers=2)
        await join_all(server)
        reply = await server.push(0, 0, 0, messages(1)[0], loss=math.nan)
        return await server.wait_epoch(1), reply

    record, reply = asyncio.run(run())
    assert record["diverged"] and record["train_loss"] is None and not reply.go


def test_the_first_joins_wait_for_every_worker():
    async def run() -> None:
        [server] = servers(1, workers=2)
        first = asyncio.ensure_future(server.join(0))
        await asyncio.sleep(0)
        assert not first.done()  # worker 1 is not ready: worker 0 does not start alone
        second = await server.join(1)
        assert (await first).go and second.go
        assert (await server.join(0)).go  # later joins (a restart) do not wait

    asyncio.run(run())


# --- the direct data plane without Ray: sockets and shared memory in one process ----------


@contextlib.contextmanager
def serving(shards: list[ShardServer]):
    """The shards' event loop in a thread, as in a shard actor; yields their endpoints."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def endpoints() -> list[dict[str, Any]]:
        return [await s.endpoint() for s in shards]

    async def cancel() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        yield asyncio.run_coroutine_threadsafe(endpoints(), loop).result(timeout=120)
    finally:
        asyncio.run_coroutine_threadsafe(cancel(), loop).result(timeout=120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=120)
        loop.close()


def with_transport(shards: list[ShardServer], transport: str) -> list[ShardServer]:
    """Fresh shards like ``shards`` (same spec, initial state) on ``transport``."""
    params = torch.linspace(-1, 1, P).numpy()
    return [
        ShardServer(
            dataclasses.replace(s.spec, transport=transport),
            params=params[slice(*s.spec.bounds)],
            buffers=[np.zeros(2, np.float32)] if s.spec.coordinator else None,
        )
        for s in shards
    ]


def links_to(shards: list[ShardServer], endpoints: list[dict[str, Any]], shared: bool):
    sizes = [4 * (hi - lo) for lo, hi in (s.spec.bounds for s in shards)]
    return transport.DirectLinks(endpoints, sizes, shared=shared)


@pytest.mark.parametrize(("kind", "shared"), [("direct", True), ("tcp", False)])
@pytest.mark.parametrize("algorithm", ["dana-zero", "dana"])
def test_the_direct_transport_carries_the_protocol_unchanged(kind, shared, algorithm):
    # Two workers on K = 2 shards through sockets (shared memory on one node, or TCP with
    # the payloads inline) get, bit for bit, the replies of the same calls made in-process;
    # the shards end in the same state; a lost message is the same one-line error. Worker 1
    # writes its messages in its links' message buffer (as a worker's backward does), worker
    # 0 sends them from its own memory; dana's shards write θ straight into their arenas.
    order, pushes = [0, 1, 1, 0, 0, 1, 0, 1], messages(8, seed=3)

    async def in_process(shards):
        await asyncio.gather(*(s.join(0) for s in shards), *(s.join(1) for s in shards))
        seqs, stamps, out = [0, 0], [0, 0], []
        for w, m in zip(order, pushes, strict=True):
            replies = await push_all(shards, w, seqs[w], stamps[w], m)
            out.append(np.concatenate([r.params for r in replies]))
            seqs[w], stamps[w] = seqs[w] + 1, replies[0].stamp
        return out

    expected = asyncio.run(in_process(servers(2, algorithm=algorithm, workers=2)))
    shards = with_transport(servers(2, algorithm=algorithm, workers=2), kind)
    with serving(shards) as endpoints:
        # Worker 0 reaches shard 1 as if it were on another node (TCP, inline payloads).
        mixed = [endpoints[0], {**endpoints[1], "unix": None}]
        links = [links_to(shards, mixed, shared), links_to(shards, endpoints, shared)]
        assert [[link.inbox is not None for link in w.links] for w in links] == [
            [shared, False],
            [shared, shared],
        ]
        buffer = np.frombuffer(links[1].message_buffer(), np.float32)
        parts = links[1].message_parts(np.float32)
        joined = [None, None]
        threads = [
            threading.Thread(target=lambda w=w: joined.__setitem__(w, links[w].join(w)))
            for w in (0, 1)
        ]  # the first joins wait for each other
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        np.testing.assert_array_equal(joined[0][0].buffers[0], np.zeros(2, np.float32))
        seqs, stamps = [0, 0], [0, 0]
        for w, m, want in zip(order, pushes, expected, strict=True):
            if w == 1:
                buffer[...] = m
                m = buffer
            slices = [m[slice(*s.spec.bounds)] for s in shards]
            if w == 1 and seqs[w] % 2:  # as a worker does: the parts themselves
                slices = parts
            if w == 1 and shared:  # where the shards read: nothing to copy
                for link, part in zip(links[1].links, slices, strict=True):
                    assert link.inbox.ctypes.data == part.ctypes.data
            buffers = [np.full(2, seqs[w], np.float32)]
            replies = links[w].push([0, 1], w, seqs[w], stamps[w], slices, 1.0, buffers)
            np.testing.assert_array_equal(np.concatenate([r.params for r in replies]), want)
            seqs[w], stamps[w] = seqs[w] + 1, replies[0].stamp
        with pytest.raises(RuntimeError, match="message 9 but 4 were applied: a message was lost"):
            links[0].push([0], 0, 9, stamps[0], [pushes[0][:11]], 1.0, None)
        for w in links:
            w.close()
    twins = servers(2, algorithm=algorithm, workers=2)
    asyncio.run(in_process(twins))
    for a, b in zip(shards, twins, strict=True):
        assert a.count == b.count == 8 and a.master.applied == b.master.applied == [4, 4]
        np.testing.assert_array_equal(a.master.params.numpy(), b.master.params.numpy())
    np.testing.assert_array_equal(shards[0].buffers[0], np.full(2, 3, np.float32))


def test_a_half_sent_message_is_never_applied_and_a_stranger_is_refused():
    # A worker dies in the middle of a TCP message (header and half its payload sent):
    # the shard drops the connection without applying it; the restarted worker joins
    # again, learns its next seq, and its message is applied once.
    [shard] = with_transport(servers(1, workers=1), "tcp")
    with serving([shard]) as [endpoint]:
        links = links_to([shard], [endpoint], shared=False)
        links.join(0)
        sock = links.links[0].sock
        message = messages(1)[0]
        body = pickle.dumps(("push", 0, 0, 0, 1.0, None, message.dtype.str, P, message.nbytes))
        sock.sendall(struct.pack("!I", len(body)) + body + message.tobytes()[: message.nbytes // 2])
        links.close()
        again = links_to([shard], [endpoint], shared=False)
        [joined] = again.join(0)
        assert joined.applied == 0 and shard.count == 0
        [reply] = again.push([0], 0, 0, joined.stamp, [message], 1.0, None)
        assert reply.applied == 1 and shard.count == 1
        again.close()
        # A peer without the endpoint's token is dropped before anything is unpickled.
        stranger = socket.create_connection((endpoint["host"], endpoint["port"]))
        stranger.sendall(bytes(32) + struct.pack("!I", len(body)) + body)
        with contextlib.suppress(ConnectionResetError):
            assert stranger.recv(1) == b""
        assert shard.count == 1
        stranger.close()


def test_the_reply_arena_frees_a_slot_with_its_last_reference_and_copies_when_full():
    arena = transport.Arena(2)
    first, second = arena.publish(np.arange(5.0)), arena.publish(np.ones(5))
    assert {arena.slot(first), arena.slot(second)} == {0, 1}
    assert not first.flags.writeable
    third = arena.publish(np.zeros(5))  # full: a private copy, sent inline
    assert arena.slot(third) is None and third.flags.writeable
    slot = arena.slot(first)
    view = first[1:]  # a view held elsewhere keeps the slot
    del first
    gc.collect()
    assert arena.slot(arena.publish(np.zeros(5))) is None
    del view
    gc.collect()
    fourth = arena.publish(np.full(5, 7.0))
    assert arena.slot(fourth) == slot
    np.testing.assert_array_equal(fourth, np.full(5, 7.0))
    np.testing.assert_array_equal(second, np.ones(5))


def test_a_reserved_slot_is_published_without_a_copy_and_freed_with_its_last_view():
    arena = transport.Arena(2)
    slot = arena.reserve(np.float32, 5)
    slot[...] = np.arange(5)
    published = arena.publish(slot)
    assert published is slot and arena.slot(published) is not None
    assert arena.holds(torch.from_numpy(slot).numpy()) and not published.flags.writeable
    other = arena.publish(np.ones(5, np.float32))
    assert arena.reserve(np.float32, 5) is None  # both taken
    assert arena.reserve(np.float32, 5000) is None  # larger than a slot
    theta = torch.from_numpy(published)  # a shard's θ living in the slot keeps it taken
    del slot, published
    gc.collect()
    assert arena.reserve(np.float32, 5) is None
    del theta
    gc.collect()
    assert arena.reserve(np.float32, 5) is not None
    np.testing.assert_array_equal(other, np.ones(5))


@pytest.mark.parametrize("algorithm", ["asgd", "dana"])
def test_replies_held_by_workers_never_change_when_theta_is_written_into_the_arena(algorithm):
    # The shard writes each new θ into a free slot; once more replies are held than there
    # are slots it steps in place on a private copy of θ. Either way every reply keeps its
    # value and the run is the in-process one bit for bit.
    def run(kind: str) -> tuple[Any, ...]:
        [shard] = with_transport(servers(1, algorithm=algorithm, workers=1), kind)

        async def pushes() -> list[np.ndarray]:
            [joined] = await join_all(shard)
            held, stamp = [joined.params], joined.stamp
            for seq, m in enumerate(messages(shard.spec.total)):  # 12, against 6 slots
                [reply] = await push_all([shard], 0, seq, stamp, m)
                held.append(reply.params)  # the worker never lets a reply go
                stamp = reply.stamp
            return held

        held = asyncio.run(pushes())
        return [h.copy() for h in held], shard.master.params.numpy().copy(), held, shard

    expected, final, _, _ = run("ray")
    got, got_final, live, shard = run("direct")
    assert sum(shard.arena.slot(h) is not None for h in live) == shard.arena.slots
    for want, value, now in zip(expected, got, live, strict=True):
        np.testing.assert_array_equal(value, want)
        np.testing.assert_array_equal(now, want)  # still, after every later update
    np.testing.assert_array_equal(got_final, final)


@pytest.mark.parametrize("algorithm", ["dana", "nag-asgd"])
def test_a_worker_computes_at_its_reply_in_place_and_its_writes_stay_its_own(algorithm):
    # One shard on this node: the worker's parameters are the reply where the shard put it
    # (no copy; dana's θ is written there by the rule, nag-asgd's reply copied there). The
    # worker scribbles over each reply it computes at, as a loss that writes its parameters
    # in place would: the shard never sees it, and every later reply, in slots used again
    # and again, is bit for bit the in-process one.
    from dana.runtime.worker import held_params

    if transport._pagemap() is None:
        pytest.skip("this system does not let a process read its page table")
    pushes = messages(10, seed=5)

    async def in_process(shard: ShardServer) -> list[np.ndarray]:
        [joined] = await join_all(shard)
        out, stamp = [joined.params.copy()], joined.stamp
        for seq, m in enumerate(pushes):
            [reply] = await push_all([shard], 0, seq, stamp, m)
            out.append(np.asarray(reply.params).copy())
            stamp = reply.stamp
        return out

    twin = servers(1, algorithm=algorithm, workers=1)[0]
    expected = asyncio.run(in_process(twin))
    [shard] = with_transport([twin], "direct")
    home = torch.zeros(P)
    with serving([shard]) as endpoints:
        links = links_to([shard], endpoints, shared=True)
        assert links.links[0].private
        replies, offsets = links.join(0), []
        stamp = replies[0].stamp
        for seq, (m, want) in enumerate(zip([*pushes, None], expected, strict=True)):
            held = held_params(links, replies, [0], [(0, P)], home)
            assert held.data_ptr() == replies[0].params.ctypes.data  # the reply itself
            np.testing.assert_array_equal(held.numpy(), want)
            assert not replies[0].params.flags.writeable  # the reply as sent stays read-only
            offsets.append(links.links[0].last_slot[0])
            held.fill_(1e6)  # the worker's own write
            assert not np.isin(1e6, shard.master.params.numpy()).any()
            if m is not None:
                replies = links.push([0], 0, seq, stamp, [m], 1.0, None)
                stamp = replies[0].stamp
        # Private copies are dropped as the worker moves on: only the last slot has any.
        link = links.links[0]
        dirty = [
            o
            for o in range(0, link.slot_bytes * shard.arena.slots, link.slot_bytes)
            if transport._written(transport._pagemap(), link.arena, o, 4 * P).any()
        ]
        assert dirty == [offsets[-1]]
        links.close()
    assert len(set(offsets)) < len(offsets)  # slots came back: their pages were dropped
    assert torch.equal(home, torch.zeros(P))  # nothing was copied
    np.testing.assert_array_equal(shard.master.params.numpy(), twin.master.params.numpy())


def test_without_a_readable_page_table_the_worker_copies_its_reply(monkeypatch):
    # Where /proc/self/pagemap cannot be read the arena is mapped read-only, as before:
    # each reply is copied into the worker's own parameters. With several shards a worker
    # always copies (its parameters are one buffer, the replies several slots).
    from dana.runtime.worker import held_params

    monkeypatch.setattr(transport, "_pagemap", lambda: None)
    [shard] = with_transport(servers(1, workers=1), "direct")
    home = torch.zeros(P)
    with serving([shard]) as endpoints:
        links = links_to([shard], endpoints, shared=True)
        assert not links.links[0].private and links.writable(0) is None
        replies = links.join(0)
        assert held_params(links, replies, [0], [(0, P)], home) is home
        np.testing.assert_array_equal(home.numpy(), replies[0].params)
        links.close()
    monkeypatch.undo()
    [shard] = with_transport(servers(1, workers=1), "direct")
    with serving([shard]) as endpoints:  # or when asked to copy
        links = transport.DirectLinks(endpoints, [4 * P], in_place=False)
        links.join(0)
        assert not links.links[0].private and links.writable(0) is None
        links.close()
    shards = with_transport(servers(2, workers=1), "direct")
    home = torch.zeros(P)
    with serving(shards) as endpoints:
        links = links_to(shards, endpoints, shared=True)
        replies = links.join(0)
        assert all(link.private for link in links.links) and links.writable(0) is not None
        assert held_params(links, replies, [0, 1], shard_bounds(P, 2), home) is home
        np.testing.assert_array_equal(home.numpy(), np.concatenate([r.params for r in replies]))
        links.close()


def test_a_reply_sent_inline_when_the_arena_is_full_is_copied_into_the_worker_s_own(
    monkeypatch,
):
    # With one reply slot the shard often finds it taken (the reply the worker holds) and
    # sends θ inline: the worker then computes at its own buffer with the reply copied in,
    # and at the slot again when a reply comes there; every reply is the in-process one.
    from dana.runtime.worker import held_params

    pushes = messages(8, seed=7)

    async def in_process(shard: ShardServer) -> list[np.ndarray]:
        [joined] = await join_all(shard)
        out, stamp = [], joined.stamp
        for seq, m in enumerate(pushes):
            [reply] = await push_all([shard], 0, seq, stamp, m)
            out.append(np.asarray(reply.params).copy())
            stamp = reply.stamp
        return out

    expected = asyncio.run(in_process(servers(1, algorithm="nag-asgd", workers=1)[0]))
    monkeypatch.setattr(transport, "make_arena", lambda workers: transport.Arena(1))
    [shard] = with_transport(servers(1, algorithm="nag-asgd", workers=1), "direct")
    home, where = torch.zeros(P), []
    with serving([shard]) as endpoints:
        links = links_to([shard], endpoints, shared=True)
        stamp = links.join(0)[0].stamp
        for seq, (m, want) in enumerate(zip(pushes, expected, strict=True)):
            replies = links.push([0], 0, seq, stamp, [m], 1.0, None)
            stamp = replies[0].stamp
            held = held_params(links, replies, [0], [(0, P)], home)
            where.append("home" if held is home else "slot")
            np.testing.assert_array_equal(held.numpy(), want)
            held.fill_(-1.0)  # the worker's own write, wherever it computes
        links.close()
    assert {"home", "slot"} <= set(where)


def test_dropping_written_pages_restores_exactly_the_pages_written():
    # The page-table check finds the pages this process wrote in a copy-on-write mapping
    # (and only those) and makes them read the shared file again.
    if transport._pagemap() is None:
        pytest.skip("this system does not let a process read its page table")
    import mmap as mmap_module

    page, pages = mmap_module.PAGESIZE, 6
    fd = os.memfd_create("test")
    os.ftruncate(fd, page * pages)
    shared = np.frombuffer(mmap_module.mmap(fd, page * pages), np.uint8)
    shared[...] = 1
    private, cow = transport._map_arena(fd, page * pages)
    os.close(fd)
    if not cow:
        pytest.skip("this system maps the arena read-only (strict overcommit)")
    mine = np.frombuffer(private, np.uint8)
    mine[page * 1 + 5] = 7  # page 1
    mine[page * 3 : page * 5] = 9  # pages 3 and 4
    shared[page * 2] = 3  # the file changes: seen through every page not written here
    assert mine[page * 2] == 3 and mine[page * 1 + 5] == 7 and mine[page * 3] == 9
    transport._drop_written_pages(private, page * 3, page * 3)  # pages 3-5 only
    assert mine[page * 1 + 5] == 7  # outside the range: still this process's copy
    np.testing.assert_array_equal(mine[page * 3 :], 1)
    transport._drop_written_pages(private, 0, page * pages)
    np.testing.assert_array_equal(mine, shared)
    shared[...] = 4  # and they follow the file again
    np.testing.assert_array_equal(mine, 4)


def test_backward_accumulates_into_an_adopted_gradient_buffer():
    # What a worker does with its links' message buffer: the gradient lands there.
    from dana.training.flat import FlatModel

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))

    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    plain, adopting = FlatModel(model()), FlatModel(model())
    buffer = torch.full((len(adopting),), 7.0)
    adopting.adopt_grad(buffer)
    for flat in (plain, adopting):
        flat.zero_grad()
        flat.model(x).square().sum().backward()
    assert adopting.gather_grad() is buffer and torch.equal(buffer, plain.gather_grad())
    with pytest.raises(ValueError, match="a gradient buffer of"):
        adopting.adopt_grad(torch.zeros(3))


def test_a_worker_stages_its_message_in_the_links_parts_copying_only_what_is_elsewhere():
    from dana.runtime.worker import stage_message

    bounds = shard_bounds(P, 2)
    buffer = np.zeros(4 * P, np.uint8)
    parts = [buffer[4 * lo : 4 * hi].view(np.float32) for lo, hi in bounds]
    grad = torch.frombuffer(buffer, dtype=torch.float32)
    grad.copy_(torch.arange(float(P)))
    assert stage_message(grad, grad, parts, bounds) is parts  # in place: no copy
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(P, dtype=np.float32))
    other = torch.linspace(-1, 1, P)  # a rule's own buffer, or a GPU's message
    assert stage_message(other, grad, parts, bounds) is parts
    np.testing.assert_array_equal(np.concatenate(parts), other.numpy())
    views = stage_message(other, grad, None, bounds)  # Ray's transport: views
    assert [v.base is not None for v in views] == [True, True]
    np.testing.assert_array_equal(np.concatenate(views), other.numpy())


def test_importing_dana_does_not_import_ray_and_a_missing_ray_is_one_line(monkeypatch):
    code = "import sys, dana, dana.runtime, dana.runtime.commands; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(DanaError, match=r"pip install 'dana\[ray\]'"):
        require_ray()


# --- real launches on a local Ray ---------------------------------------------------------


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (launch() reuses the connection)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def small(**changes: Any) -> RunConfig:
    """The CPU preset on 1024 Fashion-MNIST images, batches of 32: 32 gradients an epoch;
    evaluated on 2000 test images; warm-up over the first epoch."""
    base = dict(
        train_samples=1024,
        test_samples=2000,
        batch_size=32,
        epochs=2,
        lr=0.02,
        warmup_epochs=1.0,
    )
    return preset_config("cnn-fashion-mnist").replace(**{**base, **changes})


def simulate(config: RunConfig) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The simulator's final master model and history for ``config``, on one thread as
    the workers (so that the arithmetic, and its rounding, is the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = build_trainer(config)
        while not trainer.finished:
            trainer.run_epoch()
        return trainer.load_master_into_model().state_dict(), trainer.history
    finally:
        torch.set_num_threads(threads)


def assert_same_model(out: Path, expected: dict[str, torch.Tensor]) -> None:
    model = torch.load(out / MODEL, weights_only=True)
    assert list(model) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(model[name], value, rtol=1e-5, atol=1e-6, msg=name)


def assert_same_history(result: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Same test errors, learning rates and lags per epoch; losses to float tolerance."""
    launched = result["epochs"]
    assert [r["epoch"] for r in launched] == [r["epoch"] for r in history]
    for a, b in zip(launched, history, strict=True):
        assert a["test_error"] == b["test_error"]
        assert a["lr"] == b["lr"] and a["lag_mean"] == b["lag_mean"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)


def budget(config: RunConfig) -> int:
    return config.epochs * (config.train_samples // config.batch_size)


@pytest.mark.ray
def test_one_worker_launch_equals_the_simulator(ray_session, tmp_path):
    # dana keeps its momentum on the worker, and the cnn has BatchNorm: both must match.
    config = small(algorithm="dana", workers=1, epochs=1, train_samples=2048)
    result = launch(config, tmp_path, log=False)
    expected, history = simulate(config)
    assert_same_model(tmp_path, expected)
    assert_same_history(result, history)
    total = budget(config)
    assert result["finished"] and result["runtime"] == "ray" and result["servers"] == 1
    assert result["updates_per_worker"] == [total] and result["lag_histogram"] == {"0": total}
    assert result["throughput"] > 0 and result["worker_restarts"] == [0]
    assert json.loads((tmp_path / RESULT).read_text()) == result
    assert not (tmp_path / CHECKPOINT).exists()


@pytest.mark.ray
@pytest.mark.parametrize(
    ("algorithm", "transports"), [("dana", ("direct", "ray")), ("dana-dc", ("tcp", "direct"))]
)
def test_sharded_equals_unsharded_and_both_equal_the_simulator(
    ray_session, tmp_path, monkeypatch, algorithm, transports
):
    # Imposing the simulator's order (block-random, 2 workers, per-worker DANA momentum)
    # makes a real launch reproduce `dana run`; K = 3 shards change nothing, and neither
    # does the data plane (K = 1 on one transport, K = 3 on another). On Ray's, the second
    # launch also has the shards publish every reply in Ray's object store (as they do for
    # large models) rather than send it inside the answer. dana-dc: a new rule's master
    # state (θ̂ᵢ per worker, τ) shards unchanged too.
    config = small(algorithm=algorithm, workers=2, epochs=1, train_samples=2048, seed=1)
    expected, history = simulate(config)
    models = []
    for shards, plane in zip((1, 3), transports, strict=True):
        if shards > 1:
            monkeypatch.setattr(driver, "PUBLISH_BYTES", 0)
        out = tmp_path / f"k{shards}"
        result = launch(config, out, servers=shards, deterministic=True, transport=plane, log=False)
        assert_same_model(out, expected)
        assert_same_history(result, history)
        assert result["servers"] == shards and result["deterministic"]
        models.append(torch.load(out / MODEL, weights_only=True))
    for name in models[0]:
        assert torch.equal(models[0][name], models[1][name]), name


class Interrupted(Exception):
    pass


@pytest.mark.ray
def test_resume_and_worker_restarts_are_exact_under_the_simulators_order(
    ray_session, tmp_path, monkeypatch
):
    # A launch interrupted once epoch 1 of 2 has ended (its evaluation pending: the resume
    # does it) resumes from the shards' checkpoint; in epoch
    # 2 worker 0 is SIGKILLed once a message is answered and worker 1 raises. With the
    # simulator's order imposed, the others wait for the restarted workers, and the run
    # ends exactly where an uninterrupted simulation does: dana-zero keeps its whole state
    # on the server, which also keeps what each worker holds and its BatchNorm statistics,
    # and no message is applied twice or lost.
    config = small(algorithm="dana-zero", workers=2, schedule="round-robin", train_samples=512)
    monkeypatch.setattr(driver, "PUBLISH_BYTES", 0)  # replies by reference (transport ray)

    save = driver._Launch._save

    def stop(self) -> None:  # interrupted once epoch 1's end is saved (its evaluation pending)
        save(self)
        raise Interrupted

    monkeypatch.setattr(driver._Launch, "_save", stop)
    with pytest.raises(Interrupted):
        launch(config, tmp_path, servers=2, deterministic=True, log=False)
    monkeypatch.setattr(driver._Launch, "_save", save)
    partial = json.loads((tmp_path / RESULT).read_text())
    assert not partial["finished"] and partial["epochs"] == []
    assert (tmp_path / CHECKPOINT).exists() and not (tmp_path / MODEL).exists()
    with pytest.raises(DanaError, match="--servers 2 --deterministic"):
        launch(config, tmp_path, servers=1, deterministic=True, log=False)
    faults = [Fault(0, 10, "kill"), Fault(1, 12, "raise")]  # 8 messages each per epoch
    result = launch(config, tmp_path, servers=2, deterministic=True, faults=faults, log=False)
    expected, history = simulate(config)
    assert_same_model(tmp_path, expected)
    assert_same_history(result, history)
    assert result["worker_restarts"] == [1, 1]
    assert result["updates_per_worker"] == [budget(config) // 2] * 2
    # Finished: launching again returns the result without training.
    assert launch(config, tmp_path, servers=2, deterministic=True, log=False) == result


@pytest.mark.ray
@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a not in ("dana", "dana-zero")])
def test_every_algorithm_runs_on_real_workers(ray_session, tmp_path, algorithm):
    # dana runs in the one-worker, sharded and fault tests, dana-zero in the resume test:
    # with these, every algorithm runs on real workers (one short launch each). The
    # recorded order of updates, replayed by the simulator, gives the launch's lags.
    workers = 1 if algorithm == "baseline" else 2
    lr = 0.002 if "adam" in algorithm else 0.02
    config = small(algorithm=algorithm, workers=workers, epochs=1, lr=lr)
    result = launch(config, tmp_path, log=False)
    total = budget(config)
    assert result["finished"] and not result["diverged"]
    assert sum(result["updates_per_worker"]) == total
    assert sum(result["lag_histogram"].values()) == total
    assert all(n > 0 for n in result["updates_per_worker"])  # every worker took part
    order = result["update_order"]
    assert len(order) == total
    assert [order.count(w) for w in range(workers)] == result["updates_per_worker"]
    if algorithm == "ssgd":  # synchronous: rounds of one message per worker, no lag
        assert result["updates_per_worker"] == [total // 2] * 2
        assert result["lag_histogram"] == {"0": total}
    else:
        replayed = dana.simulate(
            torch.zeros(1), lambda p, w: [p[0]], algorithm="asgd", workers=workers,
            steps=total, lr=0.1, schedule=f"replay:{tmp_path / RESULT}",
        )  # fmt: skip
        assert replayed.order == order
        assert {str(k): v for k, v in sorted(Counter(replayed.lag).items())} == result[
            "lag_histogram"
        ]
    assert 0 < result["final_test_error"] < 90.0  # better than chance


@pytest.mark.ray
@pytest.mark.parametrize("plane", ["direct", "tcp", "ray"])
def test_killed_and_failing_workers_do_not_stop_a_free_run(ray_session, tmp_path, plane):
    # Three free workers and two shards, a few hundred updates: worker 0 dies between its
    # pushes of message 10 to the two shards, worker 1 raises before message 20, worker 2
    # is SIGKILLed once message 30 is answered. The others keep training, all three are
    # restarted (worker 0 sends shard 1 the message it missed), the shards apply exactly
    # the budget, the same messages per worker (launch checks it), and the loss goes down.
    # On every data plane.
    config = small(algorithm="dana", workers=3, epochs=2, train_samples=4096)
    faults = [Fault(0, 10, "partial"), Fault(1, 20, "raise"), Fault(2, 30, "kill")]
    result = launch(config, tmp_path, servers=2, faults=faults, transport=plane, log=False)
    total = budget(config)
    assert result["finished"] and result["worker_restarts"] == [1, 1, 1]
    assert sum(result["updates_per_worker"]) == total
    # Messages answered before each failure were applied.
    applied = result["updates_per_worker"]
    assert applied[0] >= 11 and applied[1] >= 20 and applied[2] >= 31
    losses = [r["train_loss"] for r in result["epochs"]]
    assert losses[-1] < losses[0] and result["final_test_error"] < 40.0
    # Lags: every applied update is in the histogram, the epochs' means agree with it,
    # and with one message in flight per worker the lags add up to at most (N − 1) per
    # update (each update delays each other worker's next message at most once).
    lags = {int(k): v for k, v in result["lag_histogram"].items()}
    assert sum(lags.values()) == total
    lag_sum = sum(k * v for k, v in lags.items())
    per_epoch = total // config.epochs
    assert lag_sum == pytest.approx(sum(r["lag_mean"] * per_epoch for r in result["epochs"]))
    assert lag_sum <= (config.workers - 1) * total


@pytest.mark.ray
def test_too_few_resources_is_a_one_line_error(ray_session, tmp_path):
    with pytest.raises(DanaError, match="need 12 CPUs but the Ray cluster has 4"):
        launch(small(workers=3), tmp_path, cpus_per_worker=4, log=False)
    with pytest.raises(DanaError, match="--transport must be one of direct, tcp, ray"):
        launch(small(), tmp_path, transport="udp", log=False)


def _gru_copy_task() -> Any:
    """A user's task (not a preset): a GRU on a delayed-copy problem, tensors, own metric."""
    from torch import nn

    import dana

    class Copier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.gru, self.out = nn.Embedding(6, 16), nn.GRU(16, 16), nn.Linear(16, 6)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.out(self.gru(self.embed(tokens.T))[0]).transpose(0, 1)

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x)[:, 2:].flatten(0, 1), y[:, 2:].flatten())

    def metrics(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        wrong = (model(x)[:, 2:].argmax(-1) != y[:, 2:]).float().mean(1)
        return {"token_error": wrong.sum()}

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (1024, 8), generator=g)
    targets = tokens.roll(2, dims=1)
    return dana.Task(
        "gru-copy",
        Copier,
        (tokens[:896], targets[:896]),
        loss,
        eval_data=(tokens[896:], targets[896:]),
        metrics=metrics,
    )


@pytest.mark.ray
def test_a_user_task_runs_on_ray_workers_and_survives_a_killed_worker(ray_session, tmp_path):
    # A Task object (shipped by Ray) on two free workers; worker 1 is SIGKILLed after its
    # 15th message: it is restarted, the budget is applied exactly, the loss goes down.
    task = _gru_copy_task()
    result = launch(
        task,
        tmp_path,
        faults=[Fault(1, 15, "kill")],
        log=False,
        algorithm="dana",
        workers=2,
        epochs=3,
        lr=0.5,
        batch_size=32,
        warmup_epochs=0.0,
    )
    assert result["finished"] and result["worker_restarts"] == [0, 1]
    assert sum(result["updates_per_worker"]) == 3 * (896 // 32)
    assert result["metric"] == "token_error" and result["final_test_error"] is None
    assert result["final_metric"] == result["epochs"][-1]["token_error"]
    losses = [r["train_loss"] for r in result["epochs"]]
    assert losses[-1] < losses[0]
    assert result["config"]["task"] == "python:gru-copy"
    state = torch.load(tmp_path / MODEL, weights_only=True)
    assert set(state) == set(task.build_model(0).state_dict())


@pytest.mark.ray
def test_a_loss_that_writes_its_parameters_in_place_runs_as_in_the_simulator(ray_session, tmp_path):
    # With one shard a worker computes at the reply in shared memory (the loss checks it
    # is not always at one place, as it would be if the replies were copied). A loss that writes
    # every parameter in place (here x·1, which changes no value but makes every page the
    # worker's own copy) must neither crash the worker nor leak into the next reply:
    # under the simulator's order the launch ends on the simulator's model.
    base = _gru_copy_task()
    places: list[int] = []  # where each gradient is computed (one list per process)

    def loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        places.append(next(model.parameters()).data_ptr())
        if len(places) >= 6 and len(set(places)) == 1:  # the replies' slots alternate
            raise RuntimeError("the worker copied its replies instead of computing at them")
        for p in model.parameters():
            p.data.mul_(1.0)
        return base.loss(model, batch)

    task = dataclasses.replace(base, loss=loss)
    changes = dict(algorithm="dana", workers=2, epochs=1, lr=0.5, batch_size=32)
    config = RunConfig.for_task(task, warmup_epochs=0.0, **changes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = build_trainer(config, task=task)
        while not trainer.finished:
            trainer.run_epoch()
        expected = trainer.load_master_into_model().state_dict()
    finally:
        torch.set_num_threads(threads)
    places.clear()  # the simulator's; the workers get the list with the task
    result = launch(task, tmp_path, deterministic=True, log=False, warmup_epochs=0.0, **changes)
    assert result["finished"] and result["servers"] == 1
    assert result["worker_restarts"] == [0, 0]  # no worker found itself copying
    assert_same_model(tmp_path, expected)
    losses = [r["train_loss"] for r in result["epochs"]]
    assert losses == pytest.approx([r["train_loss"] for r in trainer.history], rel=1e-6)
