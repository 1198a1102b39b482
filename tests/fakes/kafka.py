"""An in-memory Kafka cluster with aiokafka's consumer and producer calls.

No Kafka broker can be installed on these machines, so KafkaTransport is tested against
this: topics with partitions (records keyed to a partition by a hash of the key), a
group coordinator keeping committed offsets and rebalancing members as they join and
leave (calling their ConsumerRebalanceListener like aiokafka), and failure injection.
It speaks the subset of aiokafka the transport uses, with aiokafka's own structs.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import ConsumerRecord, RecordMetadata, TopicPartition

PARTITIONS = 3


class FakeKafka:
    """The cluster. ``clients()`` gives what KafkaTransport takes as its client factory."""

    def __init__(self, partitions: int = PARTITIONS) -> None:
        self.partitions = partitions
        self.topics: dict[str, list[list[ConsumerRecord[bytes, bytes]]]] = {}
        self.committed: dict[str, dict[TopicPartition, int]] = defaultdict(dict)
        self.members: dict[str, list[FakeConsumer]] = defaultdict(list)
        self.fail_sends = 0  # the next n sends raise KafkaConnectionError
        self.down = False  # producers and consumers cannot start
        self.changed = asyncio.Event()

    def clients(self) -> FakeClients:
        return FakeClients(self)

    def topic(self, name: str) -> list[list[ConsumerRecord[bytes, bytes]]]:
        return self.topics.setdefault(name, [[] for _ in range(self.partitions)])

    def append(
        self, topic: str, value: bytes, key: bytes | None, headers: Iterable[tuple[str, bytes]]
    ) -> RecordMetadata:
        partitions = self.topic(topic)
        partition = zlib.crc32(key) % self.partitions if key is not None else 0
        log = partitions[partition]
        record = ConsumerRecord(
            topic=topic,
            partition=partition,
            offset=len(log),
            timestamp=0,
            timestamp_type=0,
            key=key,
            value=value,
            checksum=None,
            serialized_key_size=len(key or b""),
            serialized_value_size=len(value),
            headers=list(headers),
        )
        log.append(record)
        self.changed.set()
        tp = TopicPartition(topic, partition)
        return RecordMetadata(topic, partition, tp, record.offset, None, 0, 0)

    def records(self, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
        """Every record of ``topic``, partition by partition."""
        return [record for log in self.topic(topic) for record in log]

    async def rebalance(self, group: str) -> None:
        """Revoke everything from every subscribed member, then deal each topic's partitions
        out again among the members subscribed to it (round robin)."""
        members = [m for m in self.members[group] if m.started and not m.manual]
        for member in members:
            await member.revoke()
        shares: dict[int, list[TopicPartition]] = defaultdict(list)
        for topic in sorted({t for member in members for t in member.subscribed}):
            readers = [i for i, member in enumerate(members) if topic in member.subscribed]
            for p in range(len(self.topic(topic))):
                shares[readers[p % len(readers)]].append(TopicPartition(topic, p))
        for i, member in enumerate(members):
            await member.receive_assignment(shares[i])


class FakeClients:
    def __init__(self, cluster: FakeKafka) -> None:
        self.cluster = cluster

    def consumer(self, *, group_id: str) -> FakeConsumer:
        return FakeConsumer(self.cluster, group_id)

    def producer(self) -> FakeProducer:
        return FakeProducer(self.cluster)


class FakeProducer:
    def __init__(self, cluster: FakeKafka) -> None:
        self.cluster = cluster

    async def start(self) -> None:
        if self.cluster.down:
            raise KafkaConnectionError("fake cluster is down")

    async def stop(self) -> None:
        return None

    async def send_and_wait(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Iterable[tuple[str, bytes]] = (),
    ) -> RecordMetadata:
        await asyncio.sleep(0)
        if self.cluster.fail_sends:
            self.cluster.fail_sends -= 1
            raise KafkaConnectionError("fake: connection lost while producing")
        return self.cluster.append(topic, value, key, headers)


class FakeConsumer:
    def __init__(self, cluster: FakeKafka, group_id: str) -> None:
        self.cluster = cluster
        self.group_id = group_id
        self.subscribed: list[str] = []
        self.listener: Any = None
        self.started = False
        self.assigned: list[TopicPartition] = []
        self.position: dict[TopicPartition, int] = {}
        self.manual = False  # assign() instead of subscribe(): no group rebalancing

    def subscribe(self, topics: Iterable[str], listener: Any = None) -> None:
        self.subscribed = list(topics)
        self.listener = listener

    async def start(self) -> None:
        if self.cluster.down:
            raise KafkaConnectionError("fake cluster is down")
        self.started = True
        self.cluster.members[self.group_id].append(self)
        if self.subscribed:
            await self.cluster.rebalance(self.group_id)

    async def stop(self) -> None:
        """Leave the group like aiokafka: no revoke callback for the member that leaves; the
        others are dealt its partitions from the last commit."""
        if not self.started:
            return
        self.assigned = []
        self.position = {}
        self.started = False
        self.cluster.members[self.group_id].remove(self)
        if not self.manual:
            await self.cluster.rebalance(self.group_id)

    async def revoke(self) -> None:
        if self.assigned and self.listener is not None:
            await self.listener.on_partitions_revoked(set(self.assigned))
        self.assigned = []
        self.position = {}

    async def receive_assignment(self, partitions: list[TopicPartition]) -> None:
        """The group's share after a rebalance (what aiokafka's coordinator does)."""
        self.assigned = partitions
        committed = self.cluster.committed[self.group_id]
        self.position = {tp: committed.get(tp, 0) for tp in partitions}
        if self.listener is not None:
            await self.listener.on_partitions_assigned(set(partitions))

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Manual assignment (aiokafka's ``assign``): read these, whatever the group does."""
        self.manual = True
        self.assigned = list(partitions)
        committed = self.cluster.committed[self.group_id]
        self.position = {tp: committed.get(tp, 0) for tp in self.assigned}

    async def topics(self) -> set[str]:
        return set(self.cluster.topics)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        if topic not in self.cluster.topics:
            return None
        return set(range(len(self.cluster.topics[topic])))

    async def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.cluster.topic(tp.topic)[tp.partition]) for tp in partitions}

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.cluster.committed[self.group_id].get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position[tp] = offset

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        deadline = asyncio.get_running_loop().time() + timeout_ms / 1000
        while True:
            batch = self._take(max_records, partitions)
            if batch:
                return batch
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return {}
            self.cluster.changed.clear()
            try:
                await asyncio.wait_for(self.cluster.changed.wait(), remaining)
            except TimeoutError:
                return {}

    def _take(
        self, max_records: int | None, only: tuple[TopicPartition, ...] = ()
    ) -> dict[TopicPartition, list[Any]]:
        batch: dict[TopicPartition, list[Any]] = {}
        budget = max_records if max_records is not None else 1_000_000
        for tp in only or self.assigned:
            log = self.cluster.topic(tp.topic)[tp.partition]
            start = self.position[tp]
            records = log[start : start + budget]
            if records:
                batch[tp] = records
                self.position[tp] = start + len(records)
                budget -= len(records)
            if budget <= 0:
                break
        return batch

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        from aiokafka.errors import CommitFailedError

        for tp, offset in offsets.items():
            if tp not in self.assigned:
                raise CommitFailedError(f"{tp} is not assigned to this member (rebalanced)")
            self.cluster.committed[self.group_id][tp] = offset
