"""What DataSender, DataReceiver and DataSystem share: a backend endpoint that ``close()``
lets go of, ``with`` blocks, and (for the two ends of a channel) the channel's name."""

from __future__ import annotations

from typing import Any, TypeVar

from ..errors import EndpointClosed

E = TypeVar("E", bound="Endpoint")


class Endpoint:
    _endpoint: Any

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._endpoint is None

    def close(self) -> None:
        raise NotImplementedError

    def _live(self) -> Any:
        if self._endpoint is None:
            raise EndpointClosed(f"{self!r} is closed")
        return self._endpoint

    def __enter__(self: E) -> E:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChannelEnd(Endpoint):
    _namespace: str
    _dataset_name: str

    @property
    def namespace(self) -> str:
        """The channel's namespace."""
        return self._namespace

    @property
    def dataset_name(self) -> str:
        """The channel's name within its namespace."""
        return self._dataset_name
