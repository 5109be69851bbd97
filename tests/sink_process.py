"""An SMTP sink in its own process, for tests whose proxy must have its event loop to itself.

``python -m tests.sink_process DIRECTORY`` listens on a free port of 127.0.0.1, prints
the port on its first line of output, and writes each accepted copy to DIRECTORY as
``<n>.eml`` (its recipient on the first line). It receives DATA with the proxy's own
server class, which reads large messages in chunks rather than line by line.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from smtp_proxy.session.auth import Networks
from smtp_proxy.session.server import ListenerPolicy, ProxySMTP


class FileSink:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.count += 1
        recipients = ",".join(envelope.rcpt_tos).encode()
        content = bytes(envelope.original_content or b"")
        path = self.directory / f"{self.count}.eml"
        path.with_suffix(".part").write_bytes(recipients + b"\n" + content)
        path.with_suffix(".part").rename(path)  # whole files only, for the reader in the test
        return "250 2.0.0 queued"


async def main(directory: Path) -> None:
    handler = FileSink(directory)
    policy = ListenerPolicy(auth_networks=Networks([]), command_timeout=300, data_timeout=600)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: ProxySMTP(handler, policy=policy, hostname="sink", data_size_limit=0, decode_data=False),
        "127.0.0.1",
        0,
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
