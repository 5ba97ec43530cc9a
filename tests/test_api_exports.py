"""The public names of the package."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

import shmchannel


def test_all_is_pinned() -> None:
    """__all__ lists exactly the public API; a change here is a change of the API."""
    assert sorted(shmchannel.__all__) == sorted(
        [
            "BrokerUnavailable", "ChannelClosed", "ChannelError", "ChannelNotFound", "ChannelTimeout",
            "DataReceiver", "DataSender", "DataSystem", "EndpointClosed", "InvalidArgument", "NameInUse",
            "ObjectLost", "ObjectNotFound", "ProtocolError", "ReentrantCall", "StoreFull", "StoreFullTimeout", "StoreStats", "UnsupportedType",
            "__version__", "start_broker", "status", "stop_broker",
        ]
    )
    for name in shmchannel.__all__:
        assert hasattr(shmchannel, name), name


def test_every_error_derives_from_channel_error() -> None:
    """Each exported error class is a ChannelError."""
    for name in shmchannel.__all__:
        obj = getattr(shmchannel, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, shmchannel.ChannelError), name


def _public_names(module: Any) -> list[tuple[str, object]]:
    """(qualified name, object) of every public class and function of ``module`` (its
    ``__all__``) and of the public classes' methods and properties."""
    import inspect

    found: list[tuple[str, object]] = []
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        found.append((f"{module.__name__}.{name}", obj))
        if inspect.isclass(obj) and not issubclass(obj, Exception):
            for member, value in vars(obj).items():
                if member.startswith("_") and member not in ("__iter__", "__aiter__", "__contains__"):
                    continue
                if inspect.isfunction(value) or isinstance(value, property):
                    found.append((f"{module.__name__}.{name}.{member}", value))
    return found


@pytest.mark.parametrize("module_name", ["shmchannel", "shmchannel.torch"])
def test_every_public_name_has_a_docstring_with_an_example(module_name: str) -> None:
    """Docs: each public class, function and method of the package (and of shmchannel.torch,
    where torch is installed) says what it does and shows an example; properties (and
    ``__contains__``) say what they are in one line."""
    if module_name == "shmchannel.torch":
        pytest.importorskip("torch", reason="the torch extra is not installed (pip install 'shmchannel[torch]')")
    module = importlib.import_module(module_name)
    missing_doc, missing_example = [], []
    for qualname, obj in _public_names(module):
        doc = (obj.fget if isinstance(obj, property) else obj).__doc__ or ""  # type: ignore[attr-defined]
        if not doc.strip():
            missing_doc.append(qualname)
        elif not isinstance(obj, property) and "Example" not in doc and not qualname.endswith("__contains__"):
            missing_example.append(qualname)
    assert not missing_doc, f"no docstring: {missing_doc}"
    assert not missing_example, f"no example in the docstring: {missing_example}"
