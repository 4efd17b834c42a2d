"""The audit log's batching: one flush per turn of the event loop, no line left behind."""

import asyncio
import io
import json

from keyhole_sidecar.audit import AuditLog, AuditRecord


class CountingStream(io.StringIO):
    flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


def test_lines_written_in_one_loop_turn_share_one_flush_before_the_loop_moves_on():
    stream = CountingStream()

    async def main():
        log = AuditLog(stream)
        for i in range(5):
            log.write(AuditRecord(mode="base-url", method="GET", host="", path=f"/{i}"))
        assert stream.flushes == 0
        await asyncio.sleep(0)  # the next turn of the loop
        assert stream.flushes == 1
        log.write(AuditRecord(mode="base-url", method="GET", host="", path="/5"))
        await asyncio.sleep(0)
        assert stream.flushes == 2

    asyncio.run(main())
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["path"] for r in records] == [f"/{i}" for i in range(6)]
    assert records[0]["time"].endswith("Z") and len(records[0]["time"]) == 24


def test_without_a_running_loop_every_line_is_written_through():
    stream = CountingStream()
    AuditLog(stream).write(AuditRecord(mode="tunnel", method="CONNECT", host="a:443"))
    assert stream.flushes == 1
