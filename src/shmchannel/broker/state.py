"""The broker's state and every decision about it; no I/O, no waiting.

The broker is the control plane: objects go from senders to receivers through the shared-
memory queues (queue/), never through it. It decides who may do what -- which channels
exist and with what shape, who sends and who receives, which memory each process owns --
and it cleans up after whoever leaves or dies:

- a receiver that detaches, or a process that dies, gives back what it claimed and never
  acknowledged (queue/reap.py), in order, at the head of its shard;
- a dead process's acknowledged objects drop their block references (its views died too);
- a sender that leaves hands its slabs over: what no block uses goes back to the store at
  once, each block still in use when it is freed (``loose``; ``sweep`` looks, on a timer
  while there are any: receivers free blocks in shared memory and tell no one).

What memory is accounted for -- channel queues, slabs, claim logs, DataSystem objects --
is kept by the bases: ``Accounts`` (accounts.py), ``SlabGrants`` for the slabs of
senders and the blocks they leave in use (slab_grants.py), and ``Takeover`` for a dead
broker's arena carried on with and the journal records of a snapshot (takeover.py). Operations either complete, raise the
error their caller gets, or return ``WAIT`` when they cannot proceed yet (a store too
full for a slab, a channel that does not exist yet); the server retries them when the
``Signal`` named for that case fires.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import pid_alive
from ..errors import EndpointClosed, InvalidArgument, StoreFull
from ..queue import layout
from ..queue import reap
from .._native import Region
from ..queue.log import CLAIMED, STATUS, ClaimLog
from ..queue.ring import Queues
from ..store import block, slabs
from ..store.allocator import Allocator
from ..store.table import ObjectTable
from . import rules
from .accounts import WAIT
from .journal import Journal
from .records import Channel, Client, Orphan, Signal
from .takeover import Takeover

#: Entries of a process's claim log: objects it may hold claimed or viewed at once. About
#: 0.3 MiB of shared memory per receiving process.
LOG_CAPACITY = 4096


class BrokerState(Takeover):
    """Channels, clients, and the memory they leave behind (see the module docstring)."""

    def __init__(
        self, table: ObjectTable, region: Region, view: memoryview, journal: Journal | None = None,
        reserve_control: Callable[[int, int], None] = lambda start, end: None,
    ) -> None:
        super().__init__(table)
        self.region, self.view = region, view
        # Channel queues and claim logs: in the control space after the store (arena.py).
        self.control = Allocator(len(view) - table.capacity)
        self._control_base = table.capacity
        self._reserve_control = reserve_control
        self.journal = journal
        self.channels: dict[tuple[str, str], Channel] = {}
        self.clients: dict[int, Client] = {}
        self.channel_created = Signal()
        self.orphans: list[Orphan] = []
        # Blocks of slabs whose sender is gone, still in use: each holds just its own
        # bytes of the store (the rest of its slab went back at once) until it is freed.
        self.loose: dict[int, int] = {}  # block offset -> reference bits
        self._lent: dict[int, list[str]] = {}  # loose block -> objects it references (slab_grants.py)
        # Taken over from a dead broker: loans of processes that may still run (key -> pid),
        # and what blocks reference that no record names (a DataSystem object sent by key):
        # each holds one reference until its process is gone / no slab is kept whole.
        self.orphan_loans: list[tuple[str, int]] = []  # (key, pid): one reference each
        self._unowned: list[str] = []
        # The header of each slab a loose block came from, kept while any of them lives:
        # a receiver freeing the block bumps the *freed* word there (store/block.py).
        self._headers: dict[int, int] = {}  # slab offset -> loose blocks of it
        self.backlogs: list[reap.Backlog] = []
        self._next_client = 0
        self._adopted: set[tuple[str, str]] = set()  # channels taken over from a dead broker
        self._claimers: set[int] = set()  # claim-log numbers in use (also by orphaned logs)

    def _log(self, msg: dict[str, Any], payload: bytes = b"") -> None:
        if self.journal is not None:
            self.journal.record(msg, payload)

    # -- clients -------------------------------------------------------------------------

    def connect(self, pid: int) -> Client:
        self._next_client += 1
        client = Client(self._next_client, pid)
        self.clients[client.id] = client
        return client

    def disconnect(self, client: Client) -> None:
        """Forget a client: what it claimed goes back, what it owns is freed or orphaned."""
        self.clients.pop(client.id, None)
        if client.log is not None:
            self._reap(client)
        if client.slabs:
            self._orphan_slabs(client, list(client.slabs))
        freed = self._settle(client)
        for ident in list(client.sends_to):
            channel = self.channels.get(ident)
            if channel is not None and channel.sender == client.id:
                # The stream does not end: what was sent stays queued, a new sender may go on.
                channel.sender = None
                if channel.closed:
                    # It marked the end and left with no farewell (killed, or cut again in
                    # its close) maybe before its wake-up: receivers would sleep past it.
                    channel.queues.wake_all()
            self._collect(ident)
        for ident in list(client.receives_from):
            channel = self.channels.get(ident)
            if channel is not None:
                channel.receivers.pop(client.id, None)
            self._collect(ident)
        if freed:
            self.store_freed.fire()

    def idle(self) -> bool:
        """Nothing to keep the broker for: no channel, no object, no owner of anything."""
        if self.channels or len(self.table) or self.orphans or self.backlogs or self.loose:
            return False
        return all(c.log is not None and not c.slabs and not c.holds and not c.allocations and not c.log.busy()
                   for c in self.clients.values())


    # -- claim logs ----------------------------------------------------------------------

    def grant_log(self, client: Client) -> ClaimLog:
        """The claim log of ``client``'s process (made on its first request)."""
        if client.log is not None:
            return client.log
        claimer = next((n for n in range(1, layout.MAX_CLAIMER + 1) if n not in self._claimers), None)
        if claimer is None:
            raise InvalidArgument(f"{layout.MAX_CLAIMER} processes receive already: no claim log is left")
        size = ClaimLog.size_for(LOG_CAPACITY)
        offset = self._control_alloc(size, "this process's claim log")
        ClaimLog.format(self.view, offset, LOG_CAPACITY)
        client.log = ClaimLog(self.region, self.view, offset, LOG_CAPACITY, claimer)
        client.log_size = size
        self._claimers.add(claimer)
        self._log({"r": "log", "offset": offset, "capacity": LOG_CAPACITY, "claimer": claimer, "pid": client.pid})
        return client.log

    def _control_alloc(self, size: int, what: str) -> int:
        """Zeroed memory of the control space for ``what``.

        Raises:
            StoreFull: the control space is used up (or its pages cannot be had).
        """
        start = self.control.alloc(size)
        if start is None:
            raise StoreFull(f"no {size} bytes are left in the control space for {what} ({self.control.capacity} in all)")
        offset = self._control_base + start
        try:
            self._reserve_control(offset, offset + size)
        except OSError as exc:
            self.control.release(start)
            raise StoreFull(f"no room in the shared-memory file system for {what}: {exc}") from exc
        self.view[offset : offset + size] = bytes(size)
        return offset

    def _control_free(self, offset: int) -> None:
        self.control.release(offset - self._control_base)

    def log_of(self, pid: int, claimer: int) -> ClaimLog | None:
        """Claim log ``claimer`` of process ``pid``: its session's, or one it had from a
        dead broker."""
        for client in self.clients.values():
            if client.pid == pid and client.log is not None and client.log.claimer == claimer:
                return client.log
        for orphan in self.orphans:
            if orphan.pid == pid and orphan.log is not None and orphan.log.claimer == claimer:
                return orphan.log
        return None

    def _reap(self, client: Client) -> None:
        """A process's claim log after its session ended (it died, or exited): its claims
        go back, its acknowledged objects' references are dropped, the log is freed once
        nothing refers to it."""
        assert client.log is not None
        self._give_back_log(client.log)
        self.orphans.append(Orphan(client.log.base, client.log_size, log=client.log))
        client.log = None
        self.sweep()

    def _give_back_log(self, log: ClaimLog) -> None:
        for channel in self.channels.values():
            for shard in range(channel.num_shards):
                backlog = reap.collect(log, channel.queues, shard, receiver=None)
                if backlog.items and not reap.give_back(backlog):
                    self.backlogs.append(backlog)
        reap.release_acknowledged(log)

    def held(self, channel: Channel, shard: int | None = None, pid: int | None = None) -> int:
        """Objects of ``channel`` claimed and not acknowledged, in every log (or that of
        ``pid``'s process), of one ``shard`` or all."""
        count = 0
        logs = [c.log for c in self.clients.values() if c.log is not None and (pid is None or c.pid == pid)]
        logs += [o.log for o in self.orphans if o.log is not None and pid is None]
        for log in logs:
            for index, state in log.entries():
                if state & STATUS == CLAIMED:
                    base, s = log.fields(index)[:2]
                    count += base == channel.queues.base and (shard is None or s == shard)
        return count + sum(len(b.items) for b in self.backlogs if b.queues is channel.queues)

    # -- channels ------------------------------------------------------------------------

    def create_channel(
        self, client: Client, namespace: str, name: str, num_shards: int, full_batch: bool, max_queue_size: int
    ) -> Channel:
        ident = (namespace, name)
        channel = self.channels.get(ident)
        in_use = sum(c.num_shards for c in self.channels.values()) - (channel.num_shards if channel else 0)
        rules.check_shards_in_all(in_use, num_shards)
        if channel is not None:
            rules.check_new_sender(
                namespace, name, attached=channel.sender is not None, closed=channel.closed,
                current=channel.shape, wanted=rules.Shape(num_shards, full_batch, max_queue_size),
                queued=sum(map(channel.depth, range(channel.num_shards))), receivers=self._receivers(channel),
            )
            if channel.shape != rules.Shape(num_shards, full_batch, max_queue_size):
                # Nothing is built on the old shape (checked above): new queues for the new one.
                self._drop(channel)
                channel = None
        if channel is None:
            channel = self._new_channel(namespace, name, num_shards, full_batch, max_queue_size)
        channel.sender = client.id
        client.sends_to.add(ident)
        self.channel_created.fire()
        return channel

    def _new_channel(self, namespace: str, name: str, num_shards: int, full_batch: bool, max_queue_size: int) -> Channel:
        plan = layout.plan(num_shards, max_queue_size, full_batch)
        base = self._control_alloc(plan.size, f"the queues of {namespace}/{name} ({num_shards} shards of {plan.ring} slots)")
        layout.write_header(self.view, base, plan)
        channel = Channel(namespace, name, num_shards, full_batch, max_queue_size,
                          Queues(self.region, self.view, base), base)
        self.channels[(namespace, name)] = channel
        self._log(channel.record())
        return channel

    def _receivers(self, channel: Channel) -> list[rules.ReceiverUse]:
        """The receivers attached to ``channel``, each with the objects of it it holds."""
        uses = []
        for client_id, shard in channel.receivers.items():
            pid = self.clients[client_id].pid
            uses.append(rules.ReceiverUse(shard, self.held(channel, shard, pid), f"pid {pid}"))
        return uses

    def channel(self, namespace: str, name: str) -> Channel:
        channel = self.channels.get((namespace, name))
        if channel is None:
            raise InvalidArgument(f"no channel {namespace}/{name}")
        return channel

    def try_attach_receiver(self, client: Client, namespace: str, name: str, shard: int) -> Any:
        """The channel, now with this client as a receiver of ``shard``; WAIT if it doesn't exist."""
        channel = self.channels.get((namespace, name))
        if channel is None:
            return WAIT
        rules.check_shard(shard, channel.num_shards, channel.label)
        channel.receivers[client.id] = shard
        client.receives_from.add((namespace, name))
        return channel

    def detach(
        self, client: Client, channel: Channel, claimer: int | None = None, receiver: int | None = None,
        shard: int | None = None,
    ) -> None:
        """End this client's role on ``channel``. For a receiver, what it claimed and did not
        acknowledge (its process's log ``claimer``, entries of its ``receiver`` number, of
        its ``shard``) goes back to the head of its shard, in order -- also for a receiver
        that attached through a broker that died since."""
        ident = (channel.namespace, channel.name)
        attached = channel.receivers.pop(client.id, None)
        shard = attached if attached is not None else shard
        log = None if claimer is None else self.log_of(client.pid, claimer)
        # No such log of this process: its session ended first (another connection: the
        # broker may see that before this detach), and gave back all its claims then.
        if log is not None and shard is not None and 0 <= shard < channel.num_shards and receiver is not None:
            backlog = reap.collect(log, channel.queues, shard, receiver=receiver)
            if backlog.items and not reap.give_back(backlog):
                self.backlogs.append(backlog)
        if channel.sender == client.id:
            channel.sender = None
        client.receives_from.discard(ident)
        client.sends_to.discard(ident)
        self._collect(ident)

    def close_channel(self, client: Client, channel: Channel) -> None:
        """End of stream (the sender marked it in shared memory already; this is for a
        sender whose process could not, for receivers its wake-up may have missed, and
        for the journal)."""
        self._check_sender(client, channel)
        if not channel.queues.closed:
            channel.queues.region.store(channel.queues.base + layout.H_CLOSED, 1)
        # Also when the sender marked it: an interrupt between its store and its wake-up,
        # the close not said again, left receivers asleep past the end. A spare wake-up
        # costs a look.
        channel.queues.wake_all()
        self._log({"r": "close", "ns": channel.namespace, "name": channel.name})
        self.detach(client, channel)

    def _collect(self, ident: tuple[str, str]) -> None:
        if ident in self._adopted:
            # A dead broker's clients may still be running, and use its channels without
            # this broker seeing them attached: none is collected until they are gone.
            if any(o.pid is not None for o in self.orphans):
                return
            self._adopted.clear()
        channel = self.channels.get(ident)
        if (channel is not None and channel.sender is None and not channel.receivers and channel.empty
                and not self.held(channel)):
            self._drop(channel)

    def _drop(self, channel: Channel) -> None:
        del self.channels[(channel.namespace, channel.name)]
        self._control_free(channel.region)
        self._log({"r": "drop", "ns": channel.namespace, "name": channel.name})
        self.store_freed.fire()

    def _check_sender(self, client: Client, channel: Channel) -> None:
        if channel.sender != client.id:
            raise EndpointClosed(f"this client is not the sender of channel {channel.label}")

    def queue(self, channel: Channel, shard: int | None) -> Any:
        """Names of the objects not yet claimed: of ``shard``, or ``{shard: names}``."""
        if shard is None:
            return {str(i): channel.queues.keys(i) for i in range(channel.num_shards)}
        return channel.queues.keys(shard)

    # -- what is left behind -------------------------------------------------------------

    def sweep(self) -> bool:
        """Return what can go back now, and free what is no longer in use: returned lists
        that had no room, orphaned slabs whose blocks are all freed, dead processes' logs
        nothing refers to. True while anything is left for a later sweep."""
        freed = False
        self.backlogs = [b for b in self.backlogs if not reap.give_back(b)]
        waiting_logs = {id(b.log) for b in self.backlogs}
        kept = []
        for orphan in self.orphans:
            if orphan.pid is not None:
                released = orphan.log.released if orphan.log is not None else self.region.load(orphan.offset + slabs.RELEASED)
                if not released and pid_alive(orphan.pid):
                    kept.append(orphan)  # a dead broker's client still running: it may use it yet
                    continue
                orphan.pid = None
                if orphan.log is None:
                    self._loosen(orphan.offset, orphan.size)
                    continue
                self._give_back_log(orphan.log)
                waiting_logs = {id(b.log) for b in self.backlogs}
            assert orphan.log is not None
            if id(orphan.log) in waiting_logs:
                kept.append(orphan)
                continue
            self._claimers.discard(orphan.log.claimer)
            self._control_free(orphan.offset)
            self._log({"r": "unlog", "offset": orphan.offset})
        for offset, refs in list(self.loose.items()):
            if block.is_free(self.region, offset, refs):
                self._free_loose(offset)
                freed = True
        # After the slabs above: a dead process's blocks in use took their references first.
        for key, pid in list(self.orphan_loans):
            if not pid_alive(pid):
                self.orphan_loans.remove((key, pid))
                freed |= self._unref(key)
        if self._unowned and not any(o.log is None for o in kept):
            for key in self._unowned:
                freed |= self._unref(key)
            self._unowned = []
        self.orphans = kept
        for ident in [(c.namespace, c.name) for c in self.channels.values() if c.sender is None and not c.receivers]:
            self._collect(ident)
        if freed:
            self.store_freed.fire()
        return self.left_behind

    @property
    def left_behind(self) -> bool:
        """Whether anything waits for a later ``sweep``."""
        return bool(self.backlogs or self.orphans or self.loose or self.orphan_loans or self._unowned)
