"""Broker plumbing of the harness: declaring like the kit, publishing with a window, cleaning up."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, AbstractRobustConnection

from common.events import (
    OrderPlaced,
    SellerNotified,
    ShipmentScheduled,
    StockReservationFailed,
    StockReserved,
    SubscriberAnnounced,
)
from common.kit.topology import Topology

#: The subscribers of OrderPlaced in the system, and the events the order service consumes.
SUBSCRIBERS = ("inventory", "logistics", "seller")
ORDER_CONSUMES = (StockReserved, StockReservationFailed, ShipmentScheduled, SellerNotified)


async def connect(url: str) -> AbstractRobustConnection:
    return await aio_pika.connect_robust(url, timeout=10)


async def declare_subscriber_queue(channel: AbstractChannel, topology: Topology,
                                   queue: str) -> tuple[AbstractExchange, AbstractQueue]:
    """`queue` exactly as a subscriber of OrderPlaced declares it (quorum, delivery limit,
    dead-letter and delay queues), bound to the prefix's order.placed fanout exchange."""
    exchange = await topology.declare_event_exchange(channel, OrderPlaced)
    return exchange, await topology.declare_subscriber_queue(channel, queue, exchange)


async def publish_window(exchange: AbstractExchange, count: int, window: int,
                         make: Callable[[], aio_pika.Message]) -> float:
    """Publish `count` messages, persistent and mandatory, with up to `window` unconfirmed
    at once; returns the seconds until the last confirm."""
    started = time.monotonic()
    remaining = count

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await exchange.publish(make(), routing_key="", mandatory=True, timeout=60)

    await asyncio.gather(*(lane() for _ in range(min(window, count))))
    return time.monotonic() - started


async def queue_counts(url: str, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(ready messages, consumers) of each queue, from passive declares (live values);
    a queue that does not exist is left out."""
    counts: dict[str, tuple[int, int]] = {}
    connection = await aio_pika.connect(url, timeout=10)
    try:
        for name in names:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                continue  # a passive declare of a missing queue closes the channel
            result = queue.declaration_result
            counts[name] = (int(result.message_count or 0), int(result.consumer_count or 0))
            with contextlib.suppress(Exception):
                await channel.close()
    finally:
        await connection.close()
    return counts


def system_names(prefix: str, subscribers: Iterable[str] = SUBSCRIBERS
                 ) -> tuple[list[str], list[str]]:
    """Every queue and exchange the system declares under `prefix` (the kit's naming)."""
    topology = Topology(prefix)
    main = [topology.queue(s, OrderPlaced) for s in subscribers]
    main += [topology.queue("order", cls) for cls in ORDER_CONSUMES]
    main.append(topology.audit_queue)
    queues = [q for name in main for q in topology.service_queues(name)]
    exchanges = [topology.exchange(cls) for cls in (OrderPlaced, *ORDER_CONSUMES)]
    exchanges += [topology.exchange(SubscriberAnnounced)]
    exchanges += [topology.dead_letter_exchange(name) for name in main]
    return queues, exchanges


async def delete(url: str, queues: Iterable[str], exchanges: Iterable[str] = ()) -> None:
    """Delete queues and exchanges by name (deleting a missing one is not an error)."""
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        for name in queues:
            if channel.is_closed:
                channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(name)
        for name in exchanges:
            if channel.is_closed:
                channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(name)
    finally:
        await connection.close()
