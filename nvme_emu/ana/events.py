"""From a :class:`~nvme_emu.ana.subsystem.ControllerNotice` to the asynchronous event a
controller posts, if its host enabled that notice (Asynchronous Event Configuration, FID 0Bh).

The subsystem decides *which* controllers are owed a notice; whether the host of each wants
it is that controller's own feature setting, so the filter lives here, applied per controller
by the caller that owns it.
"""

from __future__ import annotations

from ..spec.events import AsyncEventConfig, AsyncEventNotice, AsyncEventType
from .subsystem import ControllerNotice

#: The Asynchronous Event Configuration bit that enables each notice the subsystem raises.
ENABLED_BY: dict[AsyncEventNotice, AsyncEventConfig] = {
    AsyncEventNotice.ASYMMETRIC_NAMESPACE_ACCESS_CHANGE: AsyncEventConfig.ASYMMETRIC_NAMESPACE_ACCESS,
    AsyncEventNotice.NAMESPACE_ATTRIBUTE_CHANGED: AsyncEventConfig.NAMESPACE_ATTRIBUTE,
}


def async_event_for(notice: ControllerNotice, async_event_config: int) -> tuple[int, int, int] | None:
    """(type, information, log page) to post for ``notice``, or None while the host has the
    notice disabled (the log still changed: the host sees it at its next read)."""
    if not async_event_config & ENABLED_BY[notice.notice]:
        return None
    return AsyncEventType.NOTICE, int(notice.notice), int(notice.log_page)
