"""Joining a Ray cluster, calling our actors, and the cluster-wide views (status, stop).

Every Ray failure of an actor call is translated once, here (``Calls``), into the error
class the embedded backend raises for the same cause.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ...errors import BrokerUnavailable, ChannelError, InvalidArgument, UnsupportedType, from_wire

ADDRESS_FORMS = "'ray://host:port', 'ray:auto' or 'ray:local'"
#: The Ray namespace of what is shared by every channel: the holders and the DataSystem.
SHARED_NAMESPACE = "shmchannel"
DATASYSTEM = "shmchannel:datasystem"
#: Holders are named this and their node's id, in ``SHARED_NAMESPACE`` (holder.py).
HOLDER = "shmchannel:holder:"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InvalidArgument("the ray backend needs Ray: pip install 'shmchannel[ray]'") from None
    return ray


def connect(address: str) -> Any:
    """Initialize Ray for ``address`` in this process (once) and return the ``ray`` module.

    Raises:
        InvalidArgument: not a Ray address we know, or Ray is not installed.
        BrokerUnavailable: no Ray cluster answers there.
    """
    if not (address.startswith("ray://") or address in ("ray:auto", "ray:local")):
        raise InvalidArgument(f"a Ray address must be {ADDRESS_FORMS}, got {address!r}")
    ray = import_ray()
    if ray.is_initialized():
        return ray
    options: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False}
    try:
        if address == "ray:local":
            try:
                ray.init(address="auto", **options)
            except ConnectionError:
                from ... import config

                ray.init(include_dashboard=False, object_store_memory=config.default_memory(), **options)
        else:
            ray.init(address="auto" if address == "ray:auto" else address, **options)
    except (ConnectionError, RuntimeError) as exc:
        raise BrokerUnavailable(f"cannot reach a Ray cluster at {address!r}: {exc}") from exc
    logging.getLogger("shmchannel").info("connected to the Ray cluster at %s", address)
    return ray


def reply(value: Any) -> Any:
    """Unwrap an actor's ("ok", ...) reply or raise its ("error", code, message)."""
    if isinstance(value, tuple) and value and value[0] == "error":
        raise from_wire(value[1], value[2])
    return value


class Calls:
    """Actor calls with Ray's failures translated once, here."""

    def __init__(self, ray: Any, actor: Any, label: str) -> None:
        self.ray = ray
        self.actor = actor
        self.label = label

    def call(self, method: str, *args: Any, on_interrupt: Any = None) -> Any:
        try:
            ref = getattr(self.actor, method).remote(*args)
        except TypeError as exc:  # Ray could not serialize an argument
            raise UnsupportedType(f"obj cannot be serialized: {exc}") from exc
        try:
            return self.result(ref, method)
        except ChannelError:
            raise
        except BaseException:
            if on_interrupt is not None:
                self._cancel(ref, on_interrupt)
            raise

    def result(self, ref: Any, method: str) -> Any:
        """The reply of a call made (waiting for it), or its error."""
        try:
            return reply(self.ray.get(ref))
        except self.ray.exceptions.RayActorError as exc:
            raise BrokerUnavailable(f"the actor of channel {self.label} is gone: {exc}") from exc
        except self.ray.exceptions.RayError as exc:
            raise BrokerUnavailable(f"{method} on channel {self.label} failed in Ray: {exc}") from exc

    def _cancel(self, ref: Any, on_interrupt: Any) -> None:
        """After an interrupted wait: cancel the call; undo it if it completed anyway."""
        try:
            self.ray.cancel(ref)
            value = self.ray.get(ref, timeout=5)
        except Exception:
            return
        if isinstance(value, tuple) and value and value[0] == "ok":
            on_interrupt(value)

    def dispose(self, method: str, *args: Any) -> None:
        """Leave the channel; kill the actor if nothing is left for anyone."""
        try:
            if self.call(method, *args):
                self.ray.kill(self.actor)
        except ChannelError:
            pass


def list_channels(address: str) -> list[dict[str, Any]]:
    """Status of every shmchannel channel actor on the cluster at ``address`` (the keys of
    ``shmchannel.status``'s channels); a channel that cannot answer has an ``error`` instead.

    Raises:
        BrokerUnavailable: the cluster cannot be reached (or stopped answering).
    """
    from .actors import PREFIX

    ray = connect(address)
    try:
        actors = ray.util.list_named_actors(all_namespaces=True)
    except (ray.exceptions.RayError, ConnectionError, RuntimeError) as exc:
        raise BrokerUnavailable(f"cannot list the actors of the Ray cluster at {address!r}: {exc}") from exc
    out = []
    for entry in actors:
        if not entry["name"].startswith(PREFIX) or _shared(entry):
            continue
        try:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            out.append(ray.get(actor.status.remote(), timeout=10))
        except Exception as exc:  # an actor dying as we look: report it, do not fail the listing
            out.append({"namespace": entry["namespace"], "dataset_name": entry["name"][len(PREFIX):], "error": repr(exc)})
    return out


def _shared(entry: dict[str, str]) -> bool:
    """Is this named actor one of those every channel shares (holders, the DataSystem)?"""
    return entry["namespace"] == SHARED_NAMESPACE and (entry["name"] == DATASYSTEM or entry["name"].startswith(HOLDER))


def remove_channel(address: str, namespace: str, dataset_name: str) -> bool:
    """Kill the actor of a channel; False if there was none.

    Its objects go with it on every node: the actor held the only references to the
    queued ones (their holders keep none of their own, holder.py), so Ray frees each once
    the receivers that fetched it drop it.
    """
    from .actors import actor_name

    ray = connect(address)
    try:
        actor = ray.get_actor(actor_name(dataset_name), namespace=namespace)
    except ValueError:
        return False
    ray.kill(actor)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the name is released shortly after the kill
        try:
            ray.get_actor(actor_name(dataset_name), namespace=namespace)
        except ValueError:
            break
        time.sleep(0.05)
    return True
