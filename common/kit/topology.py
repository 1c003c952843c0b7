"""How an event maps to an exchange, a subscriber to its queues: names and declarations."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, FieldValue
from aio_pika.exceptions import ChannelPreconditionFailed

from common.events import Event
from common.kit.settings import ServiceSettings

# Quorum queues, chosen deliberately (README, "Queues"): they are RabbitMQ's durable,
# replicated queue type on 3.10 to 4.x, and their delivery limit stops a message that kills
# its consumer every time from looping forever. 3.10 has no default limit and 4.0 sets 20,
# so we always set our own. Dead-lettering is at-least-once, which needs reject-publish.
QUORUM: dict[str, FieldValue] = {
    "x-queue-type": "quorum",
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}
DEFAULT_DELIVERY_LIMIT = 10

#: A stream's segment size bounds how far past its limits it grows: the broker drops old
#: history a whole segment at a time. RabbitMQ's default segment is 500 MB.
MAX_SEGMENT_BYTES = 500_000_000
MIN_SEGMENT_BYTES = 1_048_576


@dataclass(frozen=True)
class History:
    """How much of each event's history the broker keeps: the retention of its stream."""

    #: Seconds of events kept (x-max-age).
    max_age_seconds: int
    #: Bytes of events kept (x-max-length-bytes).
    max_bytes: int

    def arguments(self) -> dict[str, FieldValue]:
        # Eight segments within the byte limit: the stream then keeps at most an eighth
        # more than asked, where one default segment would double a 500 MB limit.
        segment = min(MAX_SEGMENT_BYTES, max(MIN_SEGMENT_BYTES, self.max_bytes // 8))
        return {"x-queue-type": "stream", "x-max-age": f"{self.max_age_seconds}s",
                "x-max-length-bytes": self.max_bytes,
                "x-stream-max-segment-size-bytes": segment}


class TopologyError(RuntimeError):
    """The broker already has a queue or exchange declared differently: stop, do not guess."""


@dataclass
class Topology:
    """Every name the system uses, under an optional prefix shared by one deployment."""

    prefix: str = ""
    #: Deliveries of one message (crashes, lost connections) before the broker parks it.
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    #: Seconds between attempts of a failing delivery, one delay queue each.
    retry_delays: tuple[float, ...] = (1.0, 10.0, 60.0)
    #: The history kept of each business event (a stream bound to its exchange, declared
    #: by its producers); None: none is declared.
    history: History | None = None
    #: What this process declared, so tests can delete it afterwards.
    declared_exchanges: list[str] = field(default_factory=list)
    declared_queues: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, settings: ServiceSettings) -> Topology:
        """The topology a service's settings describe."""
        history = (History(max_age_seconds=max(1, round(settings.history_hours * 3600)),
                           max_bytes=settings.history_max_bytes)
                   if settings.history else None)
        return cls(settings.name_prefix, delivery_limit=settings.delivery_limit,
                   retry_delays=settings.retry_delays, history=history)

    def exchange(self, event: type[Event]) -> str:
        return f"{self.prefix}{event.routing}"

    def queue(self, service: str, event: type[Event]) -> str:
        return f"{self.prefix}{service}.{event.routing}"

    def history_stream(self, event: type[Event]) -> str:
        """The stream that keeps `event`'s history, for subscribers that come later."""
        return history_of(self.exchange(event))

    def keeps_history(self, event: type[Event]) -> bool:
        """Whether a producer declares `event`'s history: business events only, not the
        audit's receipts and announcements."""
        return self.history is not None and self.exchange(event) != self.audit_exchange

    def dlq(self, queue: str) -> str:
        return f"{queue}.dlq"

    def retry_queue(self, queue: str, attempt: int) -> str:
        """The delay queue a delivery waits in after its `attempt`-th failure (from 1)."""
        return f"{queue}.retry.{_seconds(self.retry_delays[attempt - 1])}"

    def service_queues(self, queue: str) -> list[str]:
        """A subscriber queue and every queue that belongs to it."""
        return [queue, self.dlq(queue), *(self.retry_queue(queue, n)
                                         for n in range(1, len(self.retry_delays) + 1))]

    @property
    def audit_exchange(self) -> str:
        return f"{self.prefix}audit"

    @property
    def audit_queue(self) -> str:
        # A kit-level durable queue, so announcements and receipts wait for the tracker
        # even when it is not running yet.
        return f"{self.prefix}audit.tracker"

    def dead_letter_exchange(self, queue: str) -> str:
        """The direct exchange through which `queue`'s deliveries go to its delay queues,
        come back, and are parked in its dead-letter queue.

        One per queue, named after it, rather than the default exchange or one shared by
        all: whoever may write to it can put messages into that queue and its dead-letter
        queue, so only the queue's own service gets that right (`common.ops.access`).
        """
        return f"{queue}.dlx"

    async def declare_exchange(self, channel: AbstractChannel, name: str,
                               kind: aio_pika.ExchangeType) -> AbstractExchange:
        try:
            exchange = await channel.declare_exchange(name, kind, durable=True)
        except ChannelPreconditionFailed as exc:
            raise TopologyError(_clash("exchange", name, exc)) from exc
        self._remember(self.declared_exchanges, name)
        return exchange

    async def declare_event_exchange(self, channel: AbstractChannel,
                                     event: type[Event]) -> AbstractExchange:
        return await self.declare_exchange(channel, self.exchange(event),
                                           aio_pika.ExchangeType.FANOUT)

    async def declare_history(self, channel: AbstractChannel, exchange: AbstractExchange,
                              event: type[Event]) -> AbstractQueue:
        """`event`'s history stream, bound to its exchange: from then on every publish to
        the exchange is kept, and confirmed only once the stream has it too."""
        if self.history is None:
            raise ValueError("this topology keeps no history")
        stream = await self.declare_queue(channel, self.history_stream(event),
                                          self.history.arguments(), quorum=False)
        await stream.bind(exchange, routing_key="")
        return stream

    async def declare_queue(self, channel: AbstractChannel, name: str,
                            arguments: dict[str, FieldValue], *, quorum: bool = True
                            ) -> AbstractQueue:
        try:
            queue = await channel.declare_queue(
                name, durable=True, arguments={**(QUORUM if quorum else {}), **arguments})
        except ChannelPreconditionFailed as exc:
            raise TopologyError(_clash("queue", name, exc)) from exc
        self._remember(self.declared_queues, name)
        return queue

    async def declare_subscriber_queue(self, channel: AbstractChannel, queue_name: str,
                                       exchange: AbstractExchange) -> AbstractQueue:
        """The subscriber's queue, its dead-letter and delay queues, and the bindings.

        Idempotent. A delivery the broker gives up on (delivery limit) is dead-lettered to
        `<queue>.dlq`; each delay queue expires its messages back into the queue. All three
        paths go through the queue's own dead-letter exchange, never the fanout (the other
        subscribers already have their copy).
        """
        dlx = await self.declare_exchange(channel, self.dead_letter_exchange(queue_name),
                                          aio_pika.ExchangeType.DIRECT)
        # The dead-letter queue is classic: operators browse it (get, then requeue), and a
        # quorum queue would count each browse as a delivery (4.0 drops a message after 20).
        dlq = await self.declare_queue(channel, self.dlq(queue_name), {"x-queue-type": "classic"},
                                       quorum=False)
        await dlq.bind(dlx, routing_key=dlq.name)
        for attempt, delay in enumerate(self.retry_delays, start=1):
            retry = await self.declare_queue(channel, self.retry_queue(queue_name, attempt), {
                "x-message-ttl": int(delay * 1000),
                "x-dead-letter-exchange": dlx.name,
                "x-dead-letter-routing-key": queue_name,
            })
            await retry.bind(dlx, routing_key=retry.name)
        queue = await self.declare_queue(channel, queue_name, {
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": dlx.name,
            "x-dead-letter-routing-key": self.dlq(queue_name),
        })
        await queue.bind(dlx, routing_key=queue_name)
        await queue.bind(exchange, routing_key="")
        return queue

    @staticmethod
    def _remember(names: list[str], name: str) -> None:
        if name not in names:
            names.append(name)


def history_of(exchange: str) -> str:
    """The history stream bound to an event exchange (`Topology.history_stream`)."""
    return f"{exchange}.history"


_DELETE_HOW = {
    "queue": "`rabbitmqctl delete_queue {name}` or the management UI",
    "exchange": "`rabbitmqadmin delete exchange name={name}` or the management UI",
}


def _seconds(delay: float) -> str:
    return f"{delay:g}s"


def _clash(kind: str, name: str, exc: ChannelPreconditionFailed) -> str:
    """Turn RabbitMQ's PRECONDITION_FAILED into what an operator needs to act on."""
    text = str(exc)
    match = re.search(r"inequivalent arg '([^']+)'.*?received (.*?) but current is (.*?)(?:'|\)|$)",
                      text)
    differs = (f"argument {match.group(1)}: this service wants {match.group(2)}, "
               f"the broker has {match.group(3)}") if match else text
    return (
        f"The broker already has {kind} {name!r} declared with other settings ({differs}). "
        f"Nothing was changed. To migrate: stop every consumer of {name!r}, move or drain its "
        f"messages (for example with a shovel to a temporary {kind}), delete it "
        f"({_DELETE_HOW[kind].format(name=name)}), then start the service again so it "
        f"declares {name!r} the new way."
    )
