"""A small client for etcd's v3 JSON gateway (``/v3/kv/...``, ``/v3/lease/...``,
``/v3/watch``), over treq or any HTTP client with treq's ``request`` method.

Only what the etcd registry needs: range, transactions, leases (grant with our own id,
revoke, keep-alive of many leases in one request, time to live) and watches. Keys and
values are bytes, base64 in the gateway's JSON; 64-bit numbers travel as strings.

Known behaviour of the gateway that this module handles (measured on etcd 3.4):

* A request over 1.5 MiB is rejected by etcd: refused here before it is sent.
* A unary request that times out or finds its member without a leader is retried on the
  next member until the caller's deadline. Retrying is only safe for idempotent requests:
  the registry makes every write a compare-and-set that recognises its own earlier success
  (see :mod:`skyproto.master.etcd_store`), and lease ids are chosen by us, so a granted
  lease granted again is "lease already exists", not a second lease.
* treq's timeout covers the response headers only, so each request here has its own
  deadline for the whole exchange (``Deferred.addTimeout`` on the injected clock).
* A watch is one long response: JSON objects one after another, and the chunks they
  arrive in are not lines (an object may be split anywhere, two may share a chunk):
  :class:`JSONStream` reassembles them. Without the header ``Grpc-Metadata-hasleader:
  true`` a watch on a member that lost quorum would hang forever; with it etcd cancels the
  watch. Whether a watch still delivers is the caller's to check (the store does).
"""

from __future__ import annotations

import base64
import codecs
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as StreamProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from ..errors import ProtocolError, SkyprotoError

#: etcd's default --max-request-bytes (1.5 MiB)
MAX_REQUEST: Final = 1536 * 1024
#: the longest JSON value a stream may hold back while waiting for its end
MAX_STREAM_VALUE: Final = 16 * 1024 * 1024
#: gRPC status codes worth another try (another member, or the same one after an election)
RETRYABLE_CODES: Final = frozenset({1, 2, 4, 8, 10, 13, 14})
NOT_FOUND: Final = 5
HEADERS: Final = {"Content-Type": ["application/json"]}
WATCH_HEADERS: Final = {**HEADERS, "Grpc-Metadata-hasleader": ["true"]}


class EtcdError(SkyprotoError):
    """etcd answered with an error, or could not be asked; ``code`` is the gRPC status."""

    def __init__(self, message: str, code: int | None = None, url: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.url = url

    @property
    def retryable(self) -> bool:
        """Whether trying again later may succeed (no answer, or a gRPC code for a transient
        failure)."""
        return self.code is None or self.code in RETRYABLE_CODES


class EtcdUnavailable(EtcdError):
    """No member answered in time: the last error says why."""


class HTTPResponse(Protocol):
    """What this module reads of a response (twisted.web's IResponse, treq's _Response)."""

    @property
    def code(self) -> int:
        """The HTTP status code."""

    def deliverBody(self, protocol: Any) -> None:
        """Stream the body into ``protocol``."""


class HTTPClient(Protocol):
    """The injected HTTP client: treq's ``HTTPClient`` (or a test's stand-in)."""

    def request(self, method: str, url: str, *, data: bytes, headers: Any) -> Deferred[Any]:
        """Send one HTTP request; fires with its response."""


def b64(data: bytes) -> str:
    """Bytes as etcd's JSON gateway wants them: base64 text."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str | None) -> bytes:
    """Base64 text from etcd's JSON gateway as bytes (absent: empty)."""
    return base64.b64decode(text) if text else b""


def _keepalive_body(leases: Sequence[int]) -> bytes:
    """One keep-alive request per lease, as the gateway reads a request stream."""
    return b"".join(json.dumps({"ID": str(lease)}).encode() for lease in leases)


def _int(value: object) -> int:
    """A 64-bit number from the gateway: a string (or a number); absent means 0."""
    if value is None:
        return 0
    if isinstance(value, int | str):
        return int(value)
    raise ProtocolError(f"etcd sent {type(value).__name__} where a number belongs")


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


@attrs.frozen
class KeyValue:
    """One etcd key-value with its revisions and lease."""

    key: bytes
    value: bytes = b""
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> KeyValue:
        """A key-value from the gateway's JSON (absent fields are 0 or empty)."""
        return cls(unb64(data.get("key")), unb64(data.get("value")),
                   _int(data.get("create_revision")), _int(data.get("mod_revision")),
                   _int(data.get("version")), _int(data.get("lease")))


@attrs.frozen
class WatchEvent:
    """One change a watch reports: a PUT or a DELETE of a key-value."""

    kind: str  # "PUT" or "DELETE"
    kv: KeyValue


@attrs.frozen
class WatchResponse:
    """One message of a watch stream."""

    revision: int  # the header's: the store's revision when it was sent
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""
    events: tuple[WatchEvent, ...] = ()

    @classmethod
    def parse(cls, result: Mapping[str, Any]) -> WatchResponse:
        """A watch response from the gateway's JSON."""
        events = tuple(WatchEvent(str(e.get("type", "PUT")), KeyValue.parse(e.get("kv", {})))
                       for e in result.get("events", ()))
        return cls(_int(result.get("header", {}).get("revision")), bool(result.get("created")),
                   bool(result.get("canceled")), _int(result.get("compact_revision")),
                   str(result.get("cancel_reason", "")), events)


@attrs.frozen
class TxnResult:
    """The outcome of a transaction: which branch ran, at what revision, and its responses."""

    succeeded: bool
    revision: int
    responses: tuple[Mapping[str, Any], ...]

    def ranges(self) -> list[list[KeyValue]]:
        """The key-values of each ``request_range`` the taken branch ran, in order."""
        return [[KeyValue.parse(kv) for kv in r["response_range"].get("kvs", ())]
                for r in self.responses if "response_range" in r]


# --- transaction parts ---------------------------------------------------------------------

def absent(key: bytes) -> dict[str, Any]:
    """Compare: the key does not exist (its create revision is 0)."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def created_at(key: bytes, revision: int, equal: bool = True) -> dict[str, Any]:
    """A transaction comparison: ``key`` was created at ``revision`` (``equal``) or not; revision 0
    means the key does not exist."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL" if equal else "NOT_EQUAL",
            "create_revision": str(revision)}


def modified_at(key: bytes, revision: int) -> dict[str, Any]:
    """Compare: the key is exactly as last seen (compare-and-set)."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    """A transaction operation: put ``value`` at ``key``, under ``lease`` if not 0."""
    request: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


def get(key: bytes) -> dict[str, Any]:
    """A transaction operation: read ``key``."""
    return {"request_range": {"key": b64(key)}}


def delete(key: bytes) -> dict[str, Any]:
    """A transaction operation: delete ``key``."""
    return {"request_delete_range": {"key": b64(key)}}


# --- streams -------------------------------------------------------------------------------

class JSONStream:
    """Whole JSON values out of a byte stream whose chunks may split them anywhere."""

    def __init__(self, on_value: Callable[[Any], None], limit: int = MAX_STREAM_VALUE) -> None:
        self._on_value = on_value
        self._limit = limit
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._json = json.JSONDecoder()
        self._text = ""

    @property
    def pending(self) -> str:
        """What arrived after the last whole value (whitespace aside)."""
        return self._text.strip()

    def feed(self, data: bytes) -> None:
        """More bytes of the stream: every JSON object they complete is handed on; bytes that are
        not UTF-8 raise ProtocolError."""
        try:
            self._text += self._utf8.decode(data)
        except UnicodeDecodeError as e:
            raise ProtocolError(f"etcd sent bytes that are not UTF-8: {e}") from None
        while True:
            text = self._text.lstrip()
            if not text:
                self._text = ""
                return
            try:
                value, end = self._json.raw_decode(text)
            except json.JSONDecodeError:
                if len(text) > self._limit:
                    raise ProtocolError(
                        f"etcd sent over {self._limit} bytes that are not JSON") from None
                self._text = text  # the rest of this value is still on its way
                return
            self._text = text[end:]
            self._on_value(value)


class _Body(StreamProtocol):
    """A response body, chunk by chunk; ``done`` fires at its end (cancel: abort it)."""

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self.on_data = on_data
        self.done: Deferred[None] = Deferred(canceller=self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        try:
            self.on_data(data)
        except Exception:
            self.done.errback(Failure())
            self._abort()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _cancel(self, d: Deferred[None]) -> None:
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()


def _read_all(response: HTTPResponse) -> Deferred[tuple[int, bytes]]:
    chunks: list[bytes] = []
    body = _Body(chunks.append)
    response.deliverBody(body)
    return body.done.addCallback(lambda _: (response.code, b"".join(chunks)))


def _error_of(code: int, body: bytes, url: str) -> EtcdError:
    try:
        data = json.loads(body)
        message = str(data.get("message") or data.get("error") or "")
        grpc = data.get("code")
        if grpc is None and isinstance(data.get("error"), dict):
            grpc = data["error"].get("grpc_code")
            message = str(data["error"].get("message", message))
    except (ValueError, AttributeError):
        message, grpc = body[:200].decode("utf-8", "replace"), None
    return EtcdError(f"etcd at {url}: {message or f'HTTP {code}'}",
                     grpc if isinstance(grpc, int) else None, url)


def _describe(failure: Failure, url: str, timeout: float) -> EtcdError:
    if isinstance(failure.value, EtcdError):
        return failure.value
    if failure.check(DeferredTimeout, ConnectingCancelledError):  # (a connect timed out)
        return EtcdError(f"etcd at {url}: no answer within {timeout:.1f} s", None, url)
    if failure.check(CancelledError):
        return EtcdError(f"etcd at {url}: cancelled", None, url)
    reasons = getattr(failure.value, "reasons", None)  # twisted.web's ResponseFailed & co.
    if isinstance(reasons, list) and reasons:
        message = "; ".join(r.getErrorMessage() if isinstance(r, Failure) else str(r)
                            for r in reasons)
    else:
        kind = failure.type.__name__ if failure.type is not None else "error"
        message = failure.getErrorMessage() or kind
    return EtcdError(f"etcd at {url}: {message}", None, url)


# --- the client ----------------------------------------------------------------------------

class EtcdWatch:
    """One watch stream on one member. ``done`` fires when the stream ends (fails with why);
    ``cancel()`` ends it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.done: Deferred[None] = Deferred()
        self._request: Deferred[Any] | None = None
        self._body: _Body | None = None

    def cancel(self) -> None:
        """Stop watching: cancel the request or the body being read."""
        if self._request is not None and not self._request.called:
            self._request.cancel()
        if self._body is not None and not self._body.done.called:
            self._body.done.cancel()


class EtcdClient:
    """etcd v3 over its JSON gateway; ``urls`` are client URLs of the cluster's members.

    Every request has a deadline on the injected clock; a retryable failure moves on to the
    next member (after a short jittered pause once every member failed) until then.
    """

    log = Logger()

    def __init__(self, urls: Sequence[str], clock: IReactorTime, http: HTTPClient,
                 attempt_timeout: float = 2.0, rng: random.Random | None = None) -> None:
        if not urls:
            raise ValueError("an etcd client needs at least one URL")
        self.urls = [url.rstrip("/") for url in urls]
        self.clock = clock
        self.http = http
        self.attempt_timeout = attempt_timeout
        self.rng = rng or random.Random()
        #: the member that answered last: tried first
        self.preferred = 0
        self._pool: Any = None

    @classmethod
    def over_treq(cls, urls: Sequence[str], reactor: Any, attempt_timeout: float = 2.0,
                  rng: random.Random | None = None) -> EtcdClient:
        """A client over treq with a pool of persistent connections on ``reactor``."""
        from treq.client import HTTPClient as TreqClient
        from twisted.web.client import Agent, HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        pool.maxPersistentPerHost = 4
        # one "Starting factory" line per connection would flood the log
        quiet: Any = type("QuietHTTPFactory", (pool._factory,), {"noisy": False})
        pool._factory = quiet
        agent = Agent(reactor, pool=pool)  # type: ignore[no-untyped-call]
        client = cls(urls, reactor, TreqClient(agent), attempt_timeout, rng)
        client._pool = pool
        return client

    def close(self) -> Deferred[None]:
        """Close the idle connections of the pool (a running watch: cancel it first)."""
        if self._pool is None:
            return succeed(None)
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed

    # --- unary requests ----------------------------------------------------------------

    def call(self, path: str, body: Mapping[str, Any] | bytes, timeout: float,
             member: int | None = None) -> Deferred[dict[str, Any]]:
        """POST ``body`` to ``path``, retrying on other members for ``timeout`` seconds
        (only on ``member``, once, if given). Fails with EtcdError or EtcdUnavailable."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        if len(data) > MAX_REQUEST:
            raise EtcdError(f"a request of {len(data)} bytes exceeds etcd's limit of "
                            f"{MAX_REQUEST} bytes")
        return Deferred.fromCoroutine(self._call(path, data, timeout, member))

    async def _call(self, path: str, data: bytes, timeout: float,
                    member: int | None) -> dict[str, Any]:
        deadline = self.clock.seconds() + timeout
        last: EtcdError | None = None
        rounds = 0
        while True:
            order = [member] if member is not None else [
                (self.preferred + i) % len(self.urls) for i in range(len(self.urls))]
            for index in order:
                left = deadline - self.clock.seconds()
                if left <= 0:
                    break
                url = self.urls[index]
                attempt = min(self.attempt_timeout, left)
                try:
                    result: dict[str, Any] = await self._post(url, path, data, attempt)
                except EtcdError as e:
                    last = e
                    if not e.retryable:
                        raise
                    continue
                if member is None:
                    self.preferred = index
                return result
            left = deadline - self.clock.seconds()
            if member is not None or left <= 0:
                break
            rounds += 1
            pause = min(left, 0.05 * 2 ** min(rounds, 5) * (0.5 + self.rng.random() / 2))
            await deferLater(self.clock, pause)
        why = str(last) if last is not None else "no time left"
        raise EtcdUnavailable(f"no etcd member answered ({', '.join(self.urls)}); last: {why}",
                              last.code if last else None)

    def _post(self, url: str, path: str, data: bytes, timeout: float) -> Deferred[Any]:
        def check(answer: tuple[int, bytes]) -> Any:
            code, body = answer
            if code != 200:
                raise _error_of(code, body, url)
            try:
                parsed = json.loads(body)
            except ValueError:
                raise EtcdError(f"etcd at {url} answered something that is not JSON",
                                None, url) from None
            if not isinstance(parsed, dict):
                raise EtcdError(f"etcd at {url} answered something that is not an object",
                                None, url)
            return parsed

        requested: Deferred[Any] = self.http.request("POST", url + path, data=data,
                                                     headers=HEADERS)
        requested.addCallback(_read_all).addCallback(check)
        requested.addTimeout(timeout, self.clock)
        return requested.addErrback(lambda f: _raise(_describe(f, url, timeout)))

    # --- kv ----------------------------------------------------------------------------

    def range(self, key: bytes, range_end: bytes = b"", timeout: float = 5.0,
              keys_only: bool = False, member: int | None = None,
              ) -> Deferred[tuple[int, list[KeyValue]]]:
        """The header revision and the key-values in [key, range_end) (linearizable)."""
        body: dict[str, Any] = {"key": b64(key)}
        if range_end:
            body["range_end"] = b64(range_end)
        if keys_only:
            body["keys_only"] = True
        return self.call("/v3/kv/range", body, timeout, member).addCallback(
            lambda r: (_int(r.get("header", {}).get("revision")),
                       [KeyValue.parse(kv) for kv in r.get("kvs", ())]))

    def txn(self, compare: Iterable[Mapping[str, Any]], success: Iterable[Mapping[str, Any]],
            failure: Iterable[Mapping[str, Any]] = (), timeout: float = 5.0,
            ) -> Deferred[TxnResult]:
        """One etcd transaction: ``success`` if every ``compare`` holds, else ``failure``."""
        body = {"compare": list(compare), "success": list(success), "failure": list(failure)}
        return self.call("/v3/kv/txn", body, timeout).addCallback(
            lambda r: TxnResult(bool(r.get("succeeded")),
                                _int(r.get("header", {}).get("revision")),
                                tuple(r.get("responses", ()))))

    def compact(self, revision: int, timeout: float = 5.0) -> Deferred[dict[str, Any]]:
        """Compact etcd's history up to ``revision``."""
        return self.call("/v3/kv/compaction", {"revision": str(revision)}, timeout)

    # --- leases ------------------------------------------------------------------------

    def new_lease_id(self) -> int:
        """A lease id of our own choosing (so that granting it again is harmless)."""
        return self.rng.randrange(1, 2 ** 63)

    def grant(self, lease: int, ttl: int, timeout: float = 5.0) -> Deferred[int]:
        """Grant lease ``lease`` for ``ttl`` seconds; a retry that finds it granted is fine."""
        def granted(result: dict[str, Any]) -> int:
            return _int(result.get("TTL"))

        def exists(failure: Failure) -> int:
            failure.trap(EtcdError)
            if "lease already exists" in str(failure.value):
                return ttl
            failure.raiseException()

        return self.call("/v3/lease/grant", {"ID": str(lease), "TTL": str(ttl)},
                         timeout).addCallbacks(granted, exists)

    def revoke(self, lease: int, timeout: float = 5.0) -> Deferred[int]:
        """Revoke a lease (its keys are deleted); the header revision after it, or 0 if
        the lease was not found (revoked or expired already)."""
        def gone(failure: Failure) -> int:
            failure.trap(EtcdError)
            if isinstance(failure.value, EtcdError) and failure.value.code == NOT_FOUND:
                return 0
            failure.raiseException()

        return self.call("/v3/lease/revoke", {"ID": str(lease)}, timeout).addCallbacks(
            lambda r: _int(r.get("header", {}).get("revision")), gone)

    def keepalive(self, leases: Sequence[int], timeout: float = 5.0) -> Deferred[dict[int, int]]:
        """Renew many leases in one request: each lease's new TTL (0 or less: it is gone).
        Every lease is answered, or it fails (EtcdUnavailable): a lease without an answer
        was not renewed."""
        if not leases:
            return succeed({})
        if len(_keepalive_body(leases)) > MAX_REQUEST:
            raise EtcdError(f"a keep-alive of {len(leases)} leases exceeds etcd's limit")
        return Deferred.fromCoroutine(self._keepalive(list(leases), timeout))

    async def _keepalive(self, leases: list[int], timeout: float) -> dict[int, int]:
        # The gateway streams one {"result": ...} per lease: _post reads them as one
        # "JSON" document, so read the stream here instead. The stream may end before
        # every lease is answered (etcd 3.4's gateway, now and then: 18 answers to 60
        # requests, in 6 of 200 requests here); the unanswered leases were not renewed,
        # so they are asked for again, until every one has its answer or time is up.
        deadline = self.clock.seconds() + timeout
        last: EtcdError | None = None
        ttls: dict[int, int] = {}
        missing = leases
        while (left := deadline - self.clock.seconds()) > 0:
            index = self.preferred
            url = self.urls[index]
            try:
                answered = await self._stream_all(url, "/v3/lease/keepalive",
                                                  _keepalive_body(missing),
                                                  min(self.attempt_timeout, left))
            except EtcdError as e:
                last = e
                if not e.retryable:
                    raise
                self.preferred = (index + 1) % len(self.urls)
                await deferLater(self.clock, min(0.05, max(0.0, left)))
                continue
            wanted = set(missing)
            ttls.update((lease, ttl) for lease, ttl in answered.items() if lease in wanted)
            missing = [lease for lease in missing if lease not in ttls]
            if not missing:
                return ttls
            last = EtcdError(f"etcd at {url} answered {len(leases) - len(missing)} of "
                             f"{len(leases)} lease renewals", url=url)
            await deferLater(self.clock, min(0.02, max(0.0, deadline - self.clock.seconds())))
        raise EtcdUnavailable(f"no etcd member answered ({', '.join(self.urls)}); last: "
                              f"{last if last else 'no time left'}", last.code if last else None)

    def _stream_all(self, url: str, path: str, data: bytes,
                    timeout: float) -> Deferred[dict[int, int]]:
        ttls: dict[int, int] = {}
        errors: list[EtcdError] = []

        def value(item: Any) -> None:
            if not isinstance(item, dict):
                raise ProtocolError("etcd sent a keep-alive answer that is not an object")
            if "error" in item:
                error = item["error"]
                message = error.get("message", "") if isinstance(error, dict) else str(error)
                code = error.get("grpc_code") if isinstance(error, dict) else item.get("code")
                errors.append(EtcdError(f"etcd at {url}: {message}",
                                        code if isinstance(code, int) else None, url))
                return
            result = item.get("result", {})
            ttls[_int(result.get("ID"))] = _int(result.get("TTL"))

        def read(response: HTTPResponse) -> Deferred[None]:
            if response.code != 200:
                return _read_all(response).addCallback(
                    lambda answer: _raise(_error_of(answer[0], answer[1], url)))
            stream = JSONStream(value)
            body = _Body(stream.feed)
            response.deliverBody(body)
            return body.done

        def finished(_: object) -> dict[int, int]:
            if errors:
                raise errors[0]
            return ttls

        requested: Deferred[Any] = self.http.request("POST", url + path, data=data,
                                                     headers=HEADERS)
        requested.addCallback(read).addCallback(finished)
        requested.addTimeout(timeout, self.clock)
        return requested.addErrback(lambda f: _raise(_describe(f, url, timeout)))

    def time_to_live(self, lease: int, timeout: float = 5.0) -> Deferred[int]:
        """Seconds a lease has left (-1: it is gone)."""
        return self.call("/v3/lease/timetolive", {"ID": str(lease)}, timeout).addCallback(
            lambda r: _int(r.get("TTL")))

    # --- watches -----------------------------------------------------------------------

    def watch(self, key: bytes, range_end: bytes, start_revision: int,
              on_response: Callable[[WatchResponse], None], member: int,
              timeout: float | None = None) -> EtcdWatch:
        """Watch [key, range_end) from ``start_revision`` on member ``member``. Each message
        goes to ``on_response``; an exception there ends the watch with it."""
        url = self.urls[member % len(self.urls)]
        watch = EtcdWatch(url)
        request = {"create_request": {"key": b64(key), "range_end": b64(range_end),
                                      "start_revision": str(start_revision),
                                      "progress_notify": True}}

        def value(item: Any) -> None:
            if not isinstance(item, dict):
                raise ProtocolError("etcd sent a watch message that is not an object")
            if "error" in item:
                error = item["error"]
                message = error.get("message", "") if isinstance(error, dict) else str(error)
                raise EtcdError(f"etcd at {url}: watch ended: {message}", None, url)
            on_response(WatchResponse.parse(item.get("result", {})))

        def read(response: HTTPResponse) -> Deferred[None]:
            if response.code != 200:
                return _read_all(response).addCallback(
                    lambda answer: _raise(_error_of(answer[0], answer[1], url)))
            stream = JSONStream(value)
            body = watch._body = _Body(stream.feed)
            response.deliverBody(body)
            return body.done

        connect_timeout = self.attempt_timeout if timeout is None else timeout
        requested: Deferred[Any] = self.http.request(
            "POST", url + "/v3/watch", data=json.dumps(request).encode(), headers=WATCH_HEADERS)
        watch._request = requested
        requested.addTimeout(connect_timeout, self.clock)
        requested.addCallback(read)
        requested.addErrback(lambda f: _raise(_describe(f, url, connect_timeout)))
        requested.chainDeferred(watch.done)
        return watch


def _raise(error: BaseException) -> Any:
    raise error
