"""The sidecar's wire to the operator channel, where calls race each other."""

from __future__ import annotations

import asyncio

import trustme

from keyhole_sidecar.operator_channel import OperatorChannel


def test_a_call_made_while_another_closes_the_session_gets_a_live_one(tmp_path):
    """When the operator goes away, the routes and values followers both fail and both close
    the session. A call made meanwhile must not be handed the closing session: aiohttp raises
    RuntimeError for it, which ended that follower for good (a pod stayed revoked after the
    operator came back)."""
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))

    async def race() -> None:
        channel = OperatorChannel("https://127.0.0.1:9", ca, tmp_path / "token")
        closing_one = channel._client()
        closing = asyncio.ensure_future(channel.close())
        await asyncio.sleep(0)  # close() is under way, awaiting the session's close
        fresh = channel._client()
        await closing
        assert closing_one.closed
        assert fresh is not closing_one and not fresh.closed
        await channel.close()
        assert fresh.closed

    asyncio.run(race())
