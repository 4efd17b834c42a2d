"""The sidecar's end of the operator channel (DESIGN.md): HTTPS to the operator, trusting the
channel's CA, authenticated with the pod-bound ServiceAccount token the kubelet keeps fresh.
What is said over it is decided in ``usage.shared``."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp

from keyhole_sidecar.usage.shared import CALL_TIMEOUT, ChannelUnavailable


class OperatorChannel:
    """The wire to the operator channel: HTTPS, trusting the channel's CA, authenticated with
    the pod-bound token the kubelet keeps fresh in ``token_file``."""

    def __init__(self, url: str, ca_file: Path, token_file: Path):
        self.url = url.rstrip("/") + "/v1/leases"
        self.ca_file, self.token_file = ca_file, token_file
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            try:
                context = ssl.create_default_context(cafile=str(self.ca_file))
            except (OSError, ssl.SSLError):
                raise ChannelUnavailable(
                    f"the operator channel's CA ({self.ca_file}) is not readable yet: the "
                    "operator writes it into the namespace's keyhole-ca-bundle") from None
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=4), trust_env=False,
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT))
        return self._session

    async def lease(self, body: dict) -> list[dict]:
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise ChannelUnavailable(f"cannot read the pod's channel token {self.token_file} "
                                     f"({exc.strerror})") from None
        try:
            async with self._client().post(
                    self.url, json=body, headers={"Authorization": f"Bearer {token}"}) as resp:
                answer = await resp.json(content_type=None)
                if resp.status != 200:
                    raise ChannelUnavailable(f"the operator refused ({resp.status}): "
                                             f"{str((answer or {}).get('error'))[:300]}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            await self.close()  # the next call dials afresh, with the CA file as it is then
            raise ChannelUnavailable(f"the operator channel {self.url} did not answer "
                                     f"({type(exc).__name__})") from None
        return list(answer.get("budgets") or [])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
