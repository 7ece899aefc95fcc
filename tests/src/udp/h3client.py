"""HTTP/3 clients for the udp suite, run from target/venv (aioquic).

  long  one QUIC connection kept open, `GET /` every --interval seconds for
        --duration seconds;
  new   --rate new QUIC connections per second for --duration seconds, one
        `GET /` each.

`SIGTERM` ends the run early: no new request starts, those in flight
finish. The server answers `gen=N` (its generation). At the end one JSON object goes
to stdout: every request's outcome (start time on CLOCK_MONOTONIC, as
`time.monotonic()` reads it, so the caller can place it next to its own
reloads), and the counts.

A request the server did not answer because it closed the connection
gracefully (a GOAWAY frame, or CONNECTION_CLOSE with NO_ERROR/H3_NO_ERROR, or
a stream reset with H3_REQUEST_REJECTED) is retried once on a new connection,
as a browser would: that is a reconnect, not a failure. A long-lived
connection that received GOAWAY is replaced before its next request (also a
reconnect). Everything else is a failure: no handshake or no answer within
the timeouts, any other close or reset, a status other than 200, a body
without `gen=N`.
"""

import argparse
import asyncio
import json
import re
import signal
import ssl
import sys
import time

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection
from aioquic.h3.connection import ErrorCode as H3ErrorCode
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamReset
from aioquic.quic.packet import QuicErrorCode

NO_ERROR = 0x0
H3_NO_ERROR = 0x100
H3_REQUEST_REJECTED = 0x10B


def error_name(code, application=True):
    """An HTTP/3 (application) or QUIC transport error code, by name."""
    try:
        return (H3ErrorCode if application else QuicErrorCode)(code).name
    except ValueError:
        pass
    if 0x100 < code <= 0x1FF:
        # aioquic closes a failed TLS handshake this way itself.
        return f"CRYPTO_ERROR, TLS alert {code - 0x100}"
    return f"error {code:#x}"


class Closed(Exception):
    """The request's connection or stream ended before the answer."""

    def __init__(self, graceful, why):
        super().__init__(why)
        self.graceful = graceful


class WatchedH3(H3Connection):
    """aioquic parses GOAWAY and drops it; this notes that it came."""

    def __init__(self, quic, on_goaway):
        super().__init__(quic)
        self._on_goaway = on_goaway

    def _handle_control_frame(self, frame_type, frame_data):
        if frame_type == FrameType.GOAWAY:
            self._on_goaway()
        super()._handle_control_frame(frame_type, frame_data)


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = WatchedH3(self._quic, self._goaway)
        self.goaway = False
        self.closed = None
        self.pending = {}

    def _goaway(self):
        self.goaway = True

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated):
            # aioquic leaves frame_type None for an application close
            # (CONNECTION_CLOSE 0x1d, HTTP/3 codes).
            application = event.frame_type is None
            graceful = event.error_code in ((NO_ERROR, H3_NO_ERROR) if application else (NO_ERROR,))
            why = error_name(event.error_code, application)
            if event.reason_phrase:
                why += f" {event.reason_phrase!r}"
            self.closed = Closed(graceful, f"connection closed ({why})")
            for request in self.pending.values():
                if not request["future"].done():
                    request["future"].set_exception(self.closed)
            self.pending.clear()
            return
        if isinstance(event, StreamReset) and event.stream_id in self.pending:
            request = self.pending.pop(event.stream_id)
            request["future"].set_exception(
                Closed(
                    event.error_code == H3_REQUEST_REJECTED,
                    f"stream reset by the server ({error_name(event.error_code)})",
                )
            )
            return
        for h3_event in self.h3.handle_event(event):
            request = self.pending.get(getattr(h3_event, "stream_id", None))
            if request is None:
                continue
            if isinstance(h3_event, HeadersReceived):
                request["status"] = dict(h3_event.headers).get(b":status", b"").decode()
            elif isinstance(h3_event, DataReceived):
                request["body"] += h3_event.data
            if h3_event.stream_ended:
                del self.pending[h3_event.stream_id]
                request["future"].set_result((request["status"], request["body"]))

    async def get(self, authority, timeout):
        if self.closed is not None:
            raise self.closed
        stream_id = self._quic.get_next_available_stream_id()
        future = asyncio.get_running_loop().create_future()
        self.pending[stream_id] = {"future": future, "status": None, "body": b""}
        self.h3.send_headers(
            stream_id,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", b"/"),
            ],
            end_stream=True,
        )
        self.transmit()
        try:
            status, body = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self.pending.pop(stream_id, None)
            raise TimeoutError(f"no answer within {timeout}s") from None
        text = body.decode(errors="replace")
        match = re.search(r"gen=(\d+)", text)
        if status != "200" or match is None:
            raise ValueError(f"status {status}, body {text.strip()!r}")
        return int(match.group(1))


class Connection:
    """A QUIC connection opened with `connect` and closed without waiting."""

    def __init__(self, args):
        self.args = args
        self.context = None
        self.client = None

    async def open(self):
        configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
        configuration.verify_mode = ssl.CERT_NONE
        configuration.idle_timeout = self.args.idle_timeout
        made = []

        def create_protocol(*args, **kwargs):
            made.append(Client(*args, **kwargs))
            return made[-1]

        self.context = connect(
            self.args.host,
            self.args.port,
            configuration=configuration,
            create_protocol=create_protocol,
        )
        try:
            self.client = await asyncio.wait_for(
                self.context.__aenter__(), self.args.handshake_timeout
            )
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"handshake: not connected within {self.args.handshake_timeout}s"
            ) from None
        except Exception as e:
            closed = made[-1].closed if made else None
            why = str(closed) if closed is not None else f"{type(e).__name__}: {e}"
            raise RuntimeError(f"handshake: {why}") from None
        return self.client

    def close(self):
        """Closes in the background (the closing period is not waited for)."""
        if self.client is not None:
            context = self.context
            self.client = None
            asyncio.ensure_future(context.__aexit__(None, None, None))


class Deadline:
    """--duration from now, or now once SIGTERM came."""

    def __init__(self, duration):
        self.at = time.monotonic() + duration

    def stop(self):
        self.at = min(self.at, time.monotonic())

    def passed(self):
        return time.monotonic() >= self.at


def outcome(start, generation=None, error=None, reconnected=False):
    return {
        "t": start,
        "ok": error is None,
        "generation": generation,
        "error": error,
        "reconnected": reconnected,
        "latency": time.monotonic() - start,
    }


async def request_with_retry(args, connection, start):
    """(outcome, connection to keep or None, reconnects)."""
    authority = f"{args.host}:{args.port}"
    reconnects = 0
    for attempt in range(2):
        try:
            if connection.client is None:
                await connection.open()
            generation = await connection.client.get(authority, args.request_timeout)
            return outcome(start, generation, reconnected=attempt > 0), connection, reconnects
        except Closed as closed:
            connection.close()
            if closed.graceful and attempt == 0:
                reconnects += 1
                connection = Connection(args)
                continue
            return outcome(start, error=str(closed), reconnected=attempt > 0), None, reconnects
        except Exception as e:
            connection.close()
            return outcome(start, error=str(e), reconnected=attempt > 0), None, reconnects
    raise AssertionError("unreachable")


async def long_lived(args, deadline):
    outcomes = []
    reconnects = 0
    connections = 0
    connection = Connection(args)
    while not deadline.passed():
        start = time.monotonic()
        if connection.client is not None and (
            connection.client.goaway or connection.client.closed is not None
        ):
            # GOAWAY (or a graceful close) between requests: replace it.
            graceful = connection.client.closed is None or connection.client.closed.graceful
            connection.close()
            connection = Connection(args)
            reconnects += graceful
        if connection.client is None:
            connections += 1
        result, kept, extra = await request_with_retry(args, connection, start)
        connections += extra
        reconnects += extra
        outcomes.append(result)
        connection = kept if kept is not None else Connection(args)
        await asyncio.sleep(max(0.0, start + args.interval - time.monotonic()))
    connection.close()
    return outcomes, reconnects, connections


async def new_connections(args, deadline):
    outcomes = []
    reconnects = 0

    async def one(start):
        nonlocal reconnects
        result, kept, extra = await request_with_retry(args, Connection(args), start)
        reconnects += extra
        if kept is not None:
            kept.close()
        outcomes.append(result)

    tasks = []
    begin = time.monotonic()
    while True:
        await asyncio.sleep(max(0.0, begin + len(tasks) / args.rate - time.monotonic()))
        if deadline.passed():
            break
        tasks.append(asyncio.ensure_future(one(time.monotonic())))
    await asyncio.gather(*tasks)
    outcomes.sort(key=lambda o: o["t"])
    return outcomes, reconnects, len(tasks)


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["long", "new"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.1, help="long: between requests")
    parser.add_argument("--rate", type=float, default=20.0, help="new: connections per second")
    parser.add_argument("--handshake-timeout", type=float, default=3.0)
    parser.add_argument("--request-timeout", type=float, default=3.0)
    parser.add_argument("--idle-timeout", type=float, default=30.0)
    args = parser.parse_args()
    started = time.monotonic()
    deadline = Deadline(args.duration)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, deadline.stop)
    # The caller waits for this line before it counts on the client running.
    print("started", file=sys.stderr, flush=True)
    if args.mode == "long":
        outcomes, reconnects, connections = await long_lived(args, deadline)
    else:
        outcomes, reconnects, connections = await new_connections(args, deadline)
    # Let background closes send their CONNECTION_CLOSE.
    await asyncio.sleep(0.2)
    by_generation = {}
    for o in outcomes:
        if o["ok"]:
            by_generation[str(o["generation"])] = by_generation.get(str(o["generation"]), 0) + 1
    json.dump(
        {
            "mode": args.mode,
            "started": started,
            "requests": len(outcomes),
            "ok": sum(o["ok"] for o in outcomes),
            "failed": sum(not o["ok"] for o in outcomes),
            "reconnects": reconnects,
            "connections": connections,
            "by_generation": by_generation,
            "outcomes": outcomes,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    asyncio.run(main())
