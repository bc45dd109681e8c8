"""The data plane: how a worker's message reaches a shard and how the reply comes back.

Every transport carries the same protocol, :meth:`ShardServer.join` and
:meth:`ShardServer.push` (unchanged: numbered messages, grants, imposed turns, SSGD rounds);
only the way the bytes travel differs. Ray keeps placement, restarts and control (epoch
ends, snapshots, liveness).

- ``"direct"`` (the default): one socket per (worker, shard) carries a small pickled
  header per message. On the shard's node (an abstract Unix socket) the payloads never go
  through it: at connection the two sides exchange shared-memory files (``memfd``, passed
  once with ``SCM_RIGHTS``). The worker's *message buffer* is where its backward writes
  the gradient (so the message is usually there already, no copy) and the rule reads its
  shard's part in place. The shard's *reply arena* is where each reply is published
  (:class:`Arena`): ``asgd`` and ``dana`` write their new θ straight into a free slot,
  other rules copy their reply there. A worker with one shard computes at the reply
  where it lies (:meth:`DirectLinks.writable`: no copy; it maps the arena copy-on-write,
  so its own writes stay private and are undone before the next reply). A worker with
  several shards copies each reply into its parameters, and so does a GPU worker, one
  that got a reply inline (arena full), and one whose system hides written pages from
  ``/proc/self/pagemap`` or charges private mappings in full (the arena is then mapped
  read-only). From another node (TCP), the payloads follow the header on the socket.
- ``"tcp"``: the same over TCP with payloads on the socket even on one node (what crosses
  nodes, testable on one machine).
- ``"ray"``: each message a Ray actor call, arrays through Ray's object store (3 ms of
  fixed cost per object on a small VM; the path before this module).

Why not the alternatives: Ray Compiled Graphs (shared-memory channels) can only be
executed by the process that compiled them, on a static graph, while here N workers push
at their own pace and restart; a ``torch.distributed`` (gloo) group has a fixed
membership and a killed rank breaks it. A socket per (worker, shard) lets a worker die and
come back (its connection closes; its half-sent message is never applied, a complete one is
applied once) and works between nodes; shared memory makes it a memory-copy path on one.

A reply's ``params`` is valid until the next call on the same links (the worker computes
at it or copies it before its next message); a shard keeps the arena slot of the reply a
worker is reading until that worker's next message.
"""

from __future__ import annotations

import asyncio
import hmac
import mmap
import os
import pickle
import secrets
import socket
import struct
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from dana.runtime.server import Reply

#: The data planes (see the module docstring).
TRANSPORTS = ("direct", "tcp", "ray")
_PREFIX = struct.Struct("!I")  # length of a pickled header
_PAGE = mmap.PAGESIZE  # 4 KiB on x86-64, 16 or 64 KiB on some Arm kernels
_TOKEN_BYTES = 32
#: Linux's ``MAP_NORESERVE`` (not in Python's ``mmap``): a copy-on-write mapping of the
#: arena reserves no memory for copies of pages that are never written.
_MAP_NORESERVE = 0x4000


# -- the shard's side ------------------------------------------------------------------------
class Arena:
    """Reply slots in one shared-memory file: :meth:`publish` copies a reply into a free
    slot and returns a read-only view of it; the slot is free again when the view (and
    every reference to it) is gone.

    A shard can also :meth:`reserve` a free slot, write its next θ there, and publish
    that without a copy. Created on first use (the slot size is the first array's). When
    every slot is in use (more replies held than ``slots``), a reply is a private copy
    instead, sent inline.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.fd: int | None = None
        self.slot_bytes = 0
        self._map: mmap.mmap | None = None
        self._base = 0  # the mapping's address
        self._free: list[int] = []
        self._slot_of: dict[int, int] = {}  # id(view) -> slot, for live views only

    def reserve(self, dtype: np.dtype, count: int) -> np.ndarray | None:
        """A free slot as a writable array (``None`` if none is free or it is too small);
        it is taken until that array and every view of it are gone. Publish that array
        (the object itself) once written: no copy."""
        nbytes = count * np.dtype(dtype).itemsize
        if self._map is None:
            self._create(nbytes)
        if not self._free or nbytes > self.slot_bytes:
            return None
        slot = self._free.pop()  # the most recently freed: its pages are resident
        view = np.frombuffer(self._map, dtype=dtype, count=count, offset=slot * self.slot_bytes)
        key = id(view)
        self._slot_of[key] = slot
        weakref.finalize(view, self._release, key, slot)
        return view

    def publish(self, array: np.ndarray) -> np.ndarray:
        if id(array) in self._slot_of:  # an array :meth:`reserve` gave: already there
            array.flags.writeable = False
            return array
        view = self.reserve(array.dtype, array.size)
        if view is None:
            return array.copy()
        view[...] = array
        view.flags.writeable = False
        return view

    def slot(self, array: Any) -> int | None:
        """The slot of ``array`` (an array :meth:`reserve` or :meth:`publish` gave), or
        ``None`` (a private copy). By identity: another view of a slot counts as private
        (sent inline, or copied into a slot of its own by :meth:`publish`)."""
        return self._slot_of.get(id(array))

    def holds(self, array: np.ndarray) -> bool:
        """Whether ``array`` (any view) lies in the arena's memory."""
        offset = array.ctypes.data - self._base
        return self._map is not None and 0 <= offset < self.slot_bytes * self.slots

    def _create(self, nbytes: int) -> None:
        self.slot_bytes = max(_PAGE, -(-nbytes // _PAGE) * _PAGE)
        self.fd = os.memfd_create("dana-replies")
        os.ftruncate(self.fd, self.slot_bytes * self.slots)  # pages are allocated on use
        self._map = mmap.mmap(self.fd, self.slot_bytes * self.slots)
        self._base = np.frombuffer(self._map, np.uint8, count=1).ctypes.data
        weakref.finalize(self, os.close, self.fd)  # the memory goes with the last mapping
        self._free = list(range(self.slots))[::-1]

    def _release(self, key: int, slot: int) -> None:
        self._slot_of.pop(key, None)
        self._free.append(slot)


def make_arena(workers: int) -> Arena | None:
    """The reply arena of a shard serving ``workers`` (``None`` where the OS has no
    ``memfd``: replies then travel inline). Slots: each worker's held reply (deterministic
    mode) and the one it is reading, the latest, a few for checkpoints in flight."""
    return Arena(2 * workers + 4) if hasattr(os, "memfd_create") else None


def start_serving(shard: Any) -> dict[str, Any]:
    """Listen for workers on TCP and (Linux) an abstract Unix socket, on the running
    event loop; return the endpoint the workers connect to.

    A connection must first send the endpoint's random ``token`` (handed to the workers
    through Ray, whose own connections are authenticated): nothing is unpickled from a
    peer that did not, as the ports are open to the network.
    """
    token = secrets.token_bytes(_TOKEN_BYTES)
    tasks: set[asyncio.Task[None]] = shard.__dict__.setdefault("_transport_tasks", set())
    tcp = socket.create_server(("", 0))
    tcp.setblocking(False)
    listeners = [(tcp, False)]
    name = None
    if hasattr(socket, "AF_UNIX") and hasattr(os, "memfd_create"):
        name = f"dana-shard-{uuid.uuid4().hex}"
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind("\0" + name)  # the abstract namespace: no file to clean up
        unix.listen(64)
        unix.setblocking(False)
        listeners.append((unix, True))
    for listener, local in listeners:
        _spawn(tasks, _accept(shard, listener, local, token, tasks))
    port = tcp.getsockname()[1]
    return {"node": _node_id(), "host": _node_ip(), "port": port, "unix": name, "token": token}


def _spawn(tasks: set[asyncio.Task[None]], coroutine: Any) -> None:
    task = asyncio.get_running_loop().create_task(coroutine)
    tasks.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(tasks.discard)


async def _accept(
    shard: Any,
    listener: socket.socket,
    local: bool,
    token: bytes,
    tasks: set[asyncio.Task[None]],
) -> None:
    loop = asyncio.get_running_loop()
    with listener:
        while True:
            connection, _ = await loop.sock_accept(listener)
            connection.setblocking(False)
            if not local:
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _spawn(tasks, _serve(shard, connection, local, token))


async def _serve(shard: Any, sock: socket.socket, local: bool, token: bytes) -> None:
    """One worker's connection: token, hello, then join/push requests answered in order."""
    loop = asyncio.get_running_loop()
    arena: Arena | None = shard.arena
    inbox: np.ndarray | None = None  # shared memory: the worker writes messages here
    received: bytearray | None = None  # inline messages land here
    lent: Any = None  # the reply the worker is reading: its arena slot stays taken
    try:
        given = bytearray(_TOKEN_BYTES)
        if not await _recv_exactly(loop, sock, memoryview(given)) or not hmac.compare_digest(
            given, token
        ):
            return
        hello, fds = await _recv_hello(loop, sock, local)
        try:
            if hello is None:
                return
            _, nbytes, offset, total = hello
            if fds and arena is not None and arena.fd is not None:
                # The worker's message buffer: it computes its messages there, the rule
                # reads this shard's part in place (read-only: a stray write faults here
                # instead of changing the worker's message).
                shared = mmap.mmap(fds[0], max(total, 1), prot=mmap.PROT_READ)
                inbox = np.frombuffer(shared, np.uint8, nbytes, offset)
                body = pickle.dumps(("hello", arena.slot_bytes, arena.slots))
                socket.send_fds(sock, [_PREFIX.pack(len(body)) + body], [arena.fd])
            else:
                await _send(loop, sock, ("hello", 0, 0))
        finally:
            for fd in fds:
                os.close(fd)  # a mapping stays
        while True:
            request = await _recv_header(loop, sock)
            if request is None:
                return
            lent = None  # a new request: the worker is done with the previous reply
            try:
                if request[0] == "join":
                    reply = await shard.join(request[1])
                else:
                    _, worker, seq, stamp, loss, buffers, dtype, count, inline = request
                    if inline:
                        if received is None or len(received) < inline:
                            received = bytearray(inline)
                        await _recv_exactly(loop, sock, memoryview(received)[:inline])
                        message = np.frombuffer(received, dtype, count)
                    elif inbox is not None:
                        message = inbox[: count * np.dtype(dtype).itemsize].view(dtype)
                    else:
                        raise RuntimeError("a shared-memory message without an inbox")
                    reply = await shard.push(worker, seq, stamp, message, loss, buffers)
            except Exception as err:  # the protocol's own errors go back to the worker
                await _send(loop, sock, ("error", f"{type(err).__name__}: {err}"))
                continue
            lent = reply.params
            slot = arena.slot(lent) if arena is not None and inbox is not None else None
            params = np.asarray(lent)
            where = ("slot", slot) if slot is not None else ("inline", params.nbytes)
            header = ("ok", reply.stamp, reply.go, reply.applied, reply.buffers,
                      params.dtype.str, params.size, where)  # fmt: skip
            await _send(loop, sock, header)
            if slot is None:
                await loop.sock_sendall(sock, _bytes(params))
    except (ConnectionError, OSError):
        pass  # the worker died or closed: its half-sent message is never applied
    finally:
        del lent, inbox
        sock.close()


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: Any) -> bool:
    """Fill ``view`` from ``sock``; ``False`` on a clean end of stream before any byte."""
    got = 0
    while got < len(view):
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError("connection closed in the middle of a message")
        got += n
    return True


async def _recv_hello(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, local: bool
) -> tuple[Any, list[int]]:
    """The worker's hello, and (Unix socket) the descriptor of its message buffer."""
    if not local:
        return await _recv_header(loop, sock), []
    while True:
        await _readable(loop, sock)
        try:
            start, fds, _, _ = socket.recv_fds(sock, _PREFIX.size, 1)
            break
        except BlockingIOError:
            continue
    try:
        return (await _recv_header(loop, sock, bytes(start)) if start else None), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def _recv_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, start: bytes = b""
) -> Any:
    """The next header (``None``: the stream ended cleanly before it); ``start``: its
    first bytes, already read."""
    prefix = bytearray(_PREFIX.size)
    prefix[: len(start)] = start
    if not await _recv_exactly(loop, sock, memoryview(prefix)[len(start) :]):
        if not start:
            return None
        raise ConnectionError("connection closed in the middle of a message")
    body = bytearray(_PREFIX.unpack(prefix)[0])
    if not await _recv_exactly(loop, sock, memoryview(body)):
        raise ConnectionError("connection closed in the middle of a message")
    return pickle.loads(body)


async def _send(loop: asyncio.AbstractEventLoop, sock: socket.socket, header: Any) -> None:
    body = pickle.dumps(header)
    await loop.sock_sendall(sock, _PREFIX.pack(len(body)) + body)


# -- the worker's side -----------------------------------------------------------------------
class RayLinks:
    """The ``"ray"`` transport: each message an actor call on every shard."""

    def __init__(self, shards: Sequence[Any]) -> None:
        self.shards = list(shards)

    def message_buffer(self) -> None:
        """No buffer of its own: Ray copies each message when the call is made."""
        return None

    def message_parts(self, dtype: Any) -> None:
        return None

    def writable(self, k: int) -> None:
        """Replies are Ray's read-only objects: the worker copies them."""
        return None

    def join(self, worker: int) -> list[Reply]:
        import ray

        return _fetched(ray.get([s.join.remote(worker) for s in self.shards]))

    def push(
        self,
        ks: Sequence[int],
        worker: int,
        seq: int,
        stamp: int,
        messages: Sequence[np.ndarray],
        loss: float,
        buffers: list[np.ndarray] | None,
    ) -> list[Reply]:
        """Push ``messages[i]`` to shard ``ks[i]`` (all at once); the replies, in order."""
        import ray

        # Each .remote() serialises its slice at once (Ray copies it into its object
        # store), so the caller may overwrite the message as soon as the calls are made.
        refs = [
            self.shards[k].push.remote(
                worker, seq, stamp, message, loss, buffers if k == 0 else None
            )
            for k, message in zip(ks, messages, strict=True)
        ]
        return _fetched(ray.get(refs))

    def close(self) -> None:
        pass


class DirectLinks:
    """The ``"direct"`` and ``"tcp"`` transports: a socket to each shard.

    Args:
        endpoints: each shard's :meth:`ShardServer.endpoint`, shard 0 first.
        nbytes: the largest message to each shard, in bytes.
        shared: use shared memory with the shards on this node (``"direct"``).
        node: this process's Ray node (``None`` without Ray: every shard is local).
        in_place: map the shards' reply arenas copy-on-write, so that :meth:`writable`
            can lend a reply to compute at (``False``: read-only, the caller copies).
    """

    def __init__(
        self,
        endpoints: Sequence[dict[str, Any]],
        nbytes: Sequence[int],
        *,
        shared: bool = True,
        node: str | None = None,
        in_place: bool = True,
    ) -> None:
        local = [shared and e["unix"] is not None and e["node"] == node for e in endpoints]
        total = sum(nbytes)
        fd = None
        if any(local) and hasattr(os, "memfd_create"):
            fd = os.memfd_create("dana-messages")
            os.ftruncate(fd, max(total, 1))
            self.messages = np.frombuffer(mmap.mmap(fd, max(total, 1)), np.uint8, total)
        else:
            self.messages = np.zeros(total, np.uint8)
        offsets = np.cumsum([0, *nbytes])[:-1].tolist()
        try:
            self.links = [
                _Link(
                    e,
                    self.messages[offset : offset + n],
                    (fd, offset, total) if here and fd is not None else None,
                    in_place,
                )
                for e, n, offset, here in zip(endpoints, nbytes, offsets, local, strict=True)
            ]
        finally:
            if fd is not None:
                os.close(fd)  # the mappings stay

    def message_buffer(self) -> np.ndarray:
        """The bytes the messages go out from: shard k's part starts after the parts of
        the shards before it. A worker that computes its message there (``FlatModel.
        adopt_grad``) saves a copy per push: a shard on this node reads it in place."""
        return self.messages

    def message_parts(self, dtype: Any) -> list[np.ndarray]:
        """Shard k's part of :meth:`message_buffer` as an array of ``dtype``, for each k:
        pushing these very arrays skips even the check of where a message lies."""
        for link in self.links:
            link.part = link.outgoing.view(dtype)
        return [link.part for link in self.links]

    def writable(self, k: int) -> np.ndarray | None:
        """Shard k's last reply as memory this process may compute at, no copy
        (:meth:`_Link.writable`), or ``None``: copy ``reply.params`` instead."""
        return self.links[k].writable()

    def join(self, worker: int) -> list[Reply]:
        for link in self.links:
            link.send(("join", worker))
        return [link.receive() for link in self.links]

    def push(
        self,
        ks: Sequence[int],
        worker: int,
        seq: int,
        stamp: int,
        messages: Sequence[np.ndarray],
        loss: float,
        buffers: list[np.ndarray] | None,
    ) -> list[Reply]:
        """As :meth:`RayLinks.push`: every message is sent before any reply is read, so
        the shards work on it in parallel."""
        for k, message in zip(ks, messages, strict=True):
            self.links[k].send_message(
                (worker, seq, stamp, loss, buffers if k == 0 else None), message
            )
        return [self.links[k].receive() for k in ks]

    def close(self) -> None:
        for link in self.links:
            link.sock.close()


class _Link:
    """One worker's connection to one shard (blocking socket)."""

    def __init__(
        self,
        endpoint: dict[str, Any],
        outgoing: np.ndarray,
        shared: tuple[int, int, int] | None,
        in_place: bool = True,
    ) -> None:
        """``outgoing``: this shard's part of the worker's message buffer (bytes);
        ``shared``: on the shard's node, the buffer's ``(fd, offset of the part, size)``;
        ``in_place``: map the arena copy-on-write where possible (:meth:`writable`)."""
        nbytes = outgoing.nbytes
        if shared is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect("\0" + endpoint["unix"])
        else:
            self.sock = socket.create_connection((endpoint["host"], endpoint["port"]))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(endpoint["token"])
        self.arena: mmap.mmap | None = None
        #: The arena is mapped copy-on-write (writable here, private to this process).
        self.private = False
        #: The last reply's ``(offset in the arena, dtype, count)`` if it came in a slot.
        self.last_slot: tuple[int, np.dtype, int] | None = None
        #: The ``(offset, nbytes)`` :meth:`writable` lent last: the only part of the
        #: arena where this process may have written (made private copies of) pages.
        self._lent: tuple[int, int] | None = None
        self.outgoing = outgoing
        #: ``outgoing``, once the shard maps it: messages are not sent inline.
        self.inbox: np.ndarray | None = None
        #: The array :meth:`DirectLinks.message_parts` made of ``outgoing``, if asked.
        self.part: np.ndarray | None = None
        self.received = bytearray(0)
        if shared is not None:
            fd, offset, total = shared
            body = pickle.dumps(("hello", nbytes, offset, total))
            socket.send_fds(self.sock, [_PREFIX.pack(len(body)) + body], [fd])
            prefix, fds, _, _ = socket.recv_fds(self.sock, _PREFIX.size, 1)
            try:
                body = self._read(_PREFIX.size - len(prefix), bytes(prefix))
                _, self.slot_bytes, slots = pickle.loads(self._read(_PREFIX.unpack(body)[0]))
                if fds:
                    size = self.slot_bytes * slots
                    self.arena, self.private = _map_arena(fds[0], size, in_place)
                    self.inbox = outgoing
            finally:
                for fd in fds:
                    os.close(fd)
        else:
            self.send(("hello", nbytes, 0, 0))
            self.receive_header()

    def send(self, header: Any, payload: np.ndarray | None = None) -> None:
        body = pickle.dumps(header)
        self.sock.sendall(_PREFIX.pack(len(body)) + body)
        if payload is not None:
            self.sock.sendall(_bytes(payload))

    def send_message(self, fields: tuple[Any, ...], message: np.ndarray) -> None:
        message = np.ascontiguousarray(message)
        if self.inbox is not None:
            if message is not self.part:
                inbox = self.inbox[: message.nbytes].view(message.dtype)
                if inbox.ctypes.data != message.ctypes.data:  # not computed in place
                    inbox[...] = message
            self.send(("push", *fields, message.dtype.str, message.size, 0))
        else:
            self.send(("push", *fields, message.dtype.str, message.size, message.nbytes), message)

    def receive(self) -> Reply:
        header = self.receive_header()
        if header[0] == "error":
            raise RuntimeError(header[1])
        _, stamp, go, applied, buffers, dtype, count, (kind, where) = header
        self.last_slot = None
        if kind == "slot":
            assert self.arena is not None
            offset = where * self.slot_bytes
            params = np.frombuffer(self.arena, dtype, count, offset=offset)
            params.flags.writeable = False
            self.last_slot = (offset, params.dtype, count)
        else:
            if len(self.received) < where:
                self.received = bytearray(where)
            self._read_into(memoryview(self.received)[:where])
            params = np.frombuffer(self.received, dtype, count)
        return Reply(params, stamp, go, applied, buffers)

    def writable(self) -> np.ndarray | None:
        """The last reply's parameters where they lie, as an array this process may
        compute at and write (``None`` unless the reply came in an arena slot of a
        copy-on-write mapping).

        A write makes a private copy of its page. Only the slot lent last can hold such
        pages (writes go through the arrays this returns), so its private pages are
        dropped here, whichever slot the new reply is in: the new slot reads exactly the
        reply, and this process holds private copies of one slot at most."""
        if self.last_slot is None or not self.private:
            return None
        assert self.arena is not None
        if self._lent is not None:
            _drop_written_pages(self.arena, *self._lent)
        offset, dtype, count = self.last_slot
        self._lent = (offset, count * dtype.itemsize)
        return np.frombuffer(self.arena, dtype, count, offset=offset)

    def receive_header(self) -> Any:
        return pickle.loads(self._read(_PREFIX.unpack(self._read(_PREFIX.size))[0]))

    def _read(self, n: int, start: bytes = b"") -> bytes:
        buffer = bytearray(start) + bytearray(n)
        self._read_into(memoryview(buffer)[len(start) :])
        return bytes(buffer)

    def _read_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("the parameter server closed the connection")
            got += n


def _map_arena(fd: int, size: int, in_place: bool = True) -> tuple[mmap.mmap, bool]:
    """A shard's reply arena as the worker maps it: copy-on-write where this process can
    see which pages it wrote (``/proc/self/pagemap``), so that it can compute at a reply
    in place; else (or not ``in_place``) read-only. Returns the mapping and whether it is
    copy-on-write."""
    if in_place and _pagemap() is not None and not _strict_overcommit():
        try:
            flags = mmap.MAP_PRIVATE | _MAP_NORESERVE
            return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE), True
        except (OSError, ValueError):
            pass
    return mmap.mmap(fd, size, prot=mmap.PROT_READ), False


def _strict_overcommit() -> bool:
    """Whether the kernel charges every writable private mapping in full (mode 2, where
    ``MAP_NORESERVE`` is ignored): the whole arena would count against the commit limit
    of every worker."""
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "2"
    except OSError:
        return False


_pagemap_fd: tuple[int, int] | None = None  # (pid, fd): a forked child opens its own


def _pagemap() -> int | None:
    """This process's ``/proc/self/pagemap`` (opened once), or ``None`` where it cannot
    be read (not Linux, or /proc hidden)."""
    global _pagemap_fd
    pid = os.getpid()
    if _pagemap_fd is None or _pagemap_fd[0] != pid:
        try:
            fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = -1
        else:
            try:
                if not _pagemap_works(fd):
                    raise OSError("the page table does not show written pages")
            except (OSError, ValueError):
                os.close(fd)
                fd = -1
        _pagemap_fd = (pid, fd)
    return _pagemap_fd[1] if _pagemap_fd[1] >= 0 else None


def _pagemap_works(fd: int) -> bool:
    """Whether ``fd`` (this process's page table) shows a page written in a private
    mapping of a file, and dropping it reads the file again: checked on a scratch file."""
    scratch = os.memfd_create("dana-pagemap-check")
    try:
        os.ftruncate(scratch, _PAGE)
        shared = mmap.mmap(scratch, _PAGE)
        private = mmap.mmap(
            scratch, _PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    finally:
        os.close(scratch)
    try:
        shared[0] = 1
        clean = private[0] == 1 and not _written(fd, private, 0, 1).any()
        private[0] = 2
        dirty = shared[0] == 1 and _written(fd, private, 0, 1).all()
        _drop_written_pages(private, 0, 1, fd)
        return clean and dirty and private[0] == 1 and not _written(fd, private, 0, 1).any()
    finally:
        private.close()
        shared.close()


_PRESENT, _SWAPPED, _FILE = np.uint64(63), np.uint64(62), np.uint64(61)


def _written(fd: int, mapping: mmap.mmap, offset: int, nbytes: int) -> np.ndarray:
    """Per page of ``mapping[offset:offset + nbytes]`` (``offset`` page-aligned), whether
    this process wrote it: reads 8 bytes of its page table ``fd`` per page, no data."""
    start = np.frombuffer(mapping, np.uint8, 1, offset).ctypes.data
    pages = -(-nbytes // _PAGE)
    raw = os.pread(fd, 8 * pages, start // _PAGE * 8)
    if len(raw) != 8 * pages:
        raise OSError("short read of /proc/self/pagemap")
    entries = np.frombuffer(raw, np.uint64)
    # A page written here is anonymous (not the file's page): present or swapped out.
    return ((((entries >> _PRESENT) | (entries >> _SWAPPED)) & ~(entries >> _FILE)) & 1) != 0


def _drop_written_pages(
    mapping: mmap.mmap, offset: int, nbytes: int, fd: int | None = None
) -> None:
    """Drop this process's private copies of the pages of ``mapping[offset:offset +
    nbytes]`` (a copy-on-write file mapping; ``offset`` page-aligned): they read the
    file again."""
    fd = _pagemap() if fd is None else fd
    if fd is None or nbytes <= 0:
        raise RuntimeError("copy-on-write replies need /proc/self/pagemap")
    written = _written(fd, mapping, offset, nbytes)
    if not written.any():
        return
    edges = np.flatnonzero(np.diff(np.concatenate(([0], written.astype(np.int8), [0]))))
    for first, stop in zip(edges[::2], edges[1::2], strict=True):
        mapping.madvise(mmap.MADV_DONTNEED, offset + int(first) * _PAGE, int(stop - first) * _PAGE)


def open_links(
    transport: str, shards: Sequence[Any], nbytes: Sequence[int], *, in_place: bool = True
) -> Any:
    """The worker's links to the shard actors ``shards`` (see :data:`TRANSPORTS`;
    ``in_place``: see :class:`DirectLinks`)."""
    if transport == "ray":
        return RayLinks(shards)
    import ray

    endpoints = ray.get([s.endpoint.remote() for s in shards])
    shared = transport == "direct"
    return DirectLinks(endpoints, nbytes, shared=shared, node=_node_id(), in_place=in_place)


def _fetched(replies: list[Reply]) -> list[Reply]:
    for reply, params in zip(replies, fetch_params(replies), strict=True):
        reply.params = params
    return replies


def fetch_params(replies: Sequence[Reply]) -> list[np.ndarray]:
    """The replies' parameters, fetching those a shard published as Ray references (in
    one call; the arrays are read in place from Ray's shared memory)."""
    params = [r.params for r in replies]
    refs = [i for i, p in enumerate(params) if not isinstance(p, np.ndarray)]
    if refs:
        import ray

        for i, array in zip(refs, ray.get([params[i] for i in refs]), strict=True):
            params[i] = array
    return params


def _bytes(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array)).cast("B")


def _node_id() -> str | None:
    """This process's Ray node, or ``None`` outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"
