"""How an event maps to an exchange, a subscriber to its queues: names and declarations."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from aio_pika.exceptions import ChannelPreconditionFailed

from common.events import Event

# Classic queues, durable. Quorum queues are the choice once delivery limits and replication
# matter (issue: delivery guarantees); switching an existing queue's type needs a migration,
# which is why the clash below says how to do one.
QUEUE_ARGUMENTS: dict[str, str] = {}


class TopologyError(RuntimeError):
    """The broker already has a queue or exchange declared differently: stop, do not guess."""


@dataclass
class Topology:
    """Every name the system uses, under an optional prefix shared by one deployment."""

    prefix: str = ""
    #: What this process declared, so tests can delete it afterwards.
    declared_exchanges: list[str] = field(default_factory=list)
    declared_queues: list[str] = field(default_factory=list)

    def exchange(self, event: type[Event]) -> str:
        return f"{self.prefix}{event.routing}"

    def queue(self, service: str, event: type[Event]) -> str:
        return f"{self.prefix}{service}.{event.routing}"

    def dlq(self, queue: str) -> str:
        return f"{queue}.dlq"

    @property
    def audit_exchange(self) -> str:
        return f"{self.prefix}audit"

    @property
    def audit_queue(self) -> str:
        # A kit-level durable queue, so announcements and receipts wait for the tracker
        # even when it is not running yet.
        return f"{self.prefix}audit.tracker"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}dead-letter"

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

    async def declare_queue(self, channel: AbstractChannel, name: str,
                            dead_letter: bool = True) -> AbstractQueue:
        arguments: dict[str, str] = dict(QUEUE_ARGUMENTS)
        if dead_letter:
            # A message the broker rejects (reject without requeue, expiry) lands in our
            # dead-letter queue too, never vanishes.
            arguments["x-dead-letter-exchange"] = self.dead_letter_exchange
            arguments["x-dead-letter-routing-key"] = self.dlq(name)
        try:
            queue = await channel.declare_queue(name, durable=True,
                                                arguments=dict(arguments))
        except ChannelPreconditionFailed as exc:
            raise TopologyError(_clash("queue", name, exc)) from exc
        self._remember(self.declared_queues, name)
        return queue

    async def declare_subscriber_queue(self, channel: AbstractChannel, queue_name: str,
                                       exchange: AbstractExchange,
                                       routing_key: str = "") -> AbstractQueue:
        """The subscriber's queue, its dead-letter queue, and the binding; idempotent."""
        dlx = await self.declare_exchange(channel, self.dead_letter_exchange,
                                          aio_pika.ExchangeType.DIRECT)
        dlq = await self.declare_queue(channel, self.dlq(queue_name), dead_letter=False)
        await dlq.bind(dlx, routing_key=dlq.name)
        queue = await self.declare_queue(channel, queue_name)
        await queue.bind(exchange, routing_key=routing_key)
        return queue

    @staticmethod
    def _remember(names: list[str], name: str) -> None:
        if name not in names:
            names.append(name)


_DELETE_HOW = {
    "queue": "`rabbitmqctl delete_queue {name}` or the management UI",
    "exchange": "`rabbitmqadmin delete exchange name={name}` or the management UI",
}


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
