"""twistd service makers: the only place that builds services from command-line options.

Every user mistake ends in one line on stderr and exit status 1, never a traceback: option
errors are caught in :meth:`OneLineOptions.parseOptions`, configuration errors (secret
file, endpoints, services, a port already taken) in the ``make_*`` functions.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

from twisted.application.service import IService, MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from . import __version__
from .address import NodeName, check_harbor, format_handle, short_hostname
from .auth import load_secret
from .endpoints import (
    endpoint_host,
    is_node_name,
    is_wildcard_interface,
    listener_client_endpoint,
    parse_endpoint_description,
    quote_field,
    require_tls,
    require_tls_support,
)
from .errors import AddressError, ConfigurationError
from .gate import FRAMINGS, GateConfig, GateFactory
from .interfaces import IRegistry
from .logformat import DaemonService, JSONLinesObserver, log_file, log_format
from .mapper.epmd import DEFAULT_PORT as EPMD_PORT
from .mapper.extra import MASTER_NAME, ROLE_MASTER
from .mapper.port import mapper_server_endpoint
from .mapper.server import MapperServerFactory, relaxed_from_environ
from .master.client import MasterClient
from .master.etcd_client import EtcdClient
from .master.etcd_store import DEFAULT_LEASE_TTL, DEFAULT_PREFIX, EtcdRegistry
from .master.registry import InMemoryRegistry
from .master.server import MasterService
from .node.host_mapper import HostMapper
from .node.node import Node
from .node.resolver import NodeResolver
from .node.service import Service as NodeServiceBase
from .services import load_service_class
from .web.address import http_endpoint, http_url
from .web.site import Web, mapper_web, master_web, node_web
from .wire.framing import DEFAULT_MAX_FRAME

log = Logger()


def exit_with(message: str, program: str) -> NoReturn:
    """Print one line saying what is wrong and exit non-zero: no traceback for users."""
    print(f"{program}: error: {message}", file=sys.stderr)
    raise SystemExit(1)


class _NamedCoerce(usage.CoerceParameter):
    """A parameter's conversion whose error names the option and the value it was given
    (usage's own says only "Parameter type enforcement failed")."""

    def dispatch(self, name: str, value: str | None) -> None:
        if value is None:
            raise usage.UsageError(f"--{name} needs a value")
        try:
            converted = self.coerce(value)
        except ValueError as e:
            said = str(e)
            raise usage.UsageError(said if said.startswith(f"--{name} ") else
                                   f"--{name} {value}: {said}") from None
        self.options.opts[name] = converted


class OneLineOptions(usage.Options):
    """Options whose errors are one line on stderr (twistd would print the whole help)."""

    program = "skyproto"

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        # An opt_ method's docstring is its help: one paragraph, however it is wrapped.
        self.docs = {name: " ".join(doc.split()) if isinstance(doc, str) else doc
                     for name, doc in self.docs.items()}
        dispatch: dict[str, Any] = self._dispatch
        for name, handler in dispatch.items():
            if type(handler) is usage.CoerceParameter:
                dispatch[name] = _NamedCoerce(self, handler.coerce)  # type: ignore[no-untyped-call]

    def opt_version(self) -> NoReturn:
        """Print skyproto's version and exit."""
        print(f"skyproto {__version__}")
        raise SystemExit(0)

    def parseOptions(self, options: Any = None) -> None:
        """Parse; a mistake is one line on stderr naming the option, and exit status 1."""
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            exit_with(f"{e} (see: twistd {self.program} --help)", self.program)


class DaemonOptions(OneLineOptions):
    """What every daemon takes: ``--http`` (metrics, health, the cluster page) and
    ``--log-format``."""

    optParameters: list[list[Any]] = [
        ["http", None, None,
         "Serve /metrics, /health (and on a master the cluster page) here: an endpoint, "
         "or a bare port for 127.0.0.1 (tcp: without interface= means 127.0.0.1 too). "
         "Default: off.", http_endpoint],
        ["log-format", None, "text", "Log lines as text, or json: one JSON object per "
         "line with the structured fields.", log_format],
    ]


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"{text} is not a positive number")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"{text} is not a positive integer")
    return value


TLS_DIR_HELP = ("This daemon's TLS identity directory (ca.pem, node.crt, node.key, made by "
                "'skyproto tls cert NAME --dir D'), used by every skytls: endpoint without "
                "dir=, including the skytls: addresses other nodes advertise.")


def configure_tls(options: Mapping[str, Any], endpoints: Iterable[tuple[str, str | None]],
                  program: str) -> None:
    """Before anything listens: TLS endpoints without pyOpenSSL, and an unusable
    ``--tls-dir``, are one line and exit 1. ``endpoints``: (option, value) pairs."""
    given = [(option, endpoint) for option, endpoint in endpoints if endpoint is not None]
    try:
        for option, endpoint in given:
            require_tls(option, endpoint)
        if options.get("tls-dir") is not None:
            require_tls_support("--tls-dir")
            from .transports.tls import set_default_identity

            set_default_identity(options["tls-dir"])
        else:
            for option, endpoint in given:
                kind, _, kwargs = parse_endpoint_description(endpoint)
                if kind.lower() == "skytls" and option != "--advertise" and \
                        not kwargs.get("dir"):
                    raise ConfigurationError(
                        f"{option} {endpoint} has no TLS identity: give --tls-dir DIR "
                        "(or dir=DIR in the endpoint)")
    except ConfigurationError as e:
        exit_with(str(e), program)


def parse_store(text: str) -> list[str]:
    """``--store``: ``memory`` (no URLs) or ``etcd:URL[,URL...]`` (the URLs)."""
    if text == "memory":
        return []
    kind, colon, rest = text.partition(":")
    if kind != "etcd" or not colon:
        raise ValueError(f"{text!r} is neither 'memory' nor etcd:URL[,URL...]")
    urls = [url.strip() for url in rest.split(",")]
    for url in urls:
        scheme, _, where = url.partition("://")
        host, _, port = where.rstrip("/").rpartition(":")
        if scheme not in ("http", "https") or not host or not port.isdigit() or \
                not 0 < int(port) < 65536:
            raise ValueError(f"{url!r} is not an etcd client URL like http://127.0.0.1:2379")
    return urls


def _lease_ttl(text: str) -> int:
    value = int(text)
    if value < 2:
        raise ValueError(f"{text} is below etcd's shortest lease of 2 s")
    return value


class MasterOptions(DaemonOptions):
    """Options for ``twistd skymaster``."""

    program = "skymaster"
    synopsis = "[options]"
    longdesc = ("Run the master name service: harbor id -> node, global name -> handle, "
                "pushed to every node. Nodes re-register by themselves after a restart.")
    optParameters = [
        ["listen", None, "tcp:2013:interface=127.0.0.1", "Endpoint to listen on."],
        ["secret-file", None, "~/.skyproto.cookie",
         "Cluster secret (created with mode 0600 if missing)."],
        ["tls-dir", None, None, TLS_DIR_HELP],
        ["heartbeat-interval", None, 1.0, "Seconds between heartbeats.", _positive_float],
        ["heartbeat-timeout", None, 3.0, "Seconds of silence before a node is down.",
         _positive_float],
        ["store", None, "memory", "Where the registry lives: 'memory' (this process only) "
         "or etcd:URL[,URL...] (etcd v3 client URLs, e.g. etcd:http://127.0.0.1:2379; any "
         "number of masters may share one etcd).", parse_store],
        ["store-prefix", None, DEFAULT_PREFIX, "With --store etcd: the key prefix (masters "
         "with the same prefix share one table)."],
        ["store-lease-ttl", None, DEFAULT_LEASE_TTL, "With --store etcd: seconds a node's "
         "keys outlive a master that stopped renewing them (at least 2).", _lease_ttl],
        ["name", None, MASTER_NAME, "The name this master registers with its host's port "
         "mapper: nodes give --master NAME@THISHOST and need no port."],
        ["mapper", None, None, "This host's port mapper (default tcp:127.0.0.1:"
         "$ERL_EPMD_PORT, or 4369); started in this process if none answers."],
        ["mapper-listen", None, None, "Where this master runs the mapper when none answers: "
         "an endpoint, or an interface address for the mapper's port. Default: where "
         "--mapper points (127.0.0.1), but every interface when --listen is on every "
         "interface."],
    ]
    optFlags = [
        ["no-mapper", None, "Do not register with this host's port mapper (nodes then need "
         "the master's endpoint, not NAME@HOST)."],
    ]

    def postOptions(self) -> None:
        """Check the options together (heartbeat timing, the master's name, the store)."""
        if self["heartbeat-timeout"] <= self["heartbeat-interval"]:
            raise usage.UsageError("--heartbeat-timeout must be longer than --heartbeat-interval")
        try:
            self["master_name"] = master_name(self["name"])
        except AddressError as e:
            raise usage.UsageError(f"--name: {e}") from None
        if isinstance(self["store"], str):  # the default, not passed through parse_store
            self["store"] = parse_store(self["store"])
        prefix = self["store-prefix"]
        if not prefix.startswith("/") or not prefix.endswith("/") or \
                any(c.isspace() for c in prefix):
            raise usage.UsageError(f"--store-prefix must start and end with '/' and hold no "
                                   f"spaces, not {prefix!r}")



def master_name(text: str) -> str:
    """``--name`` of a master: NAME (or NAME@HOST, whose HOST is this host anyway); the
    NAME part. AddressError if it is not a name a mapper takes."""
    name = NodeName.parse(text).name
    if ":" in name:
        raise AddressError(f"a master's name has no ':' (it is NAME@HOST), not {text!r}")
    return name


def mapper_port(environ: Mapping[str, str]) -> int:
    """The mapper's port: ``ERL_EPMD_PORT`` if set (as epmd and erl read it), else 4369."""
    text = environ.get("ERL_EPMD_PORT", "")
    if not text:
        return EPMD_PORT
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigurationError(f"ERL_EPMD_PORT must be a port number, not {text!r}")
    return int(text)


class MapperOptions(DaemonOptions):
    """Options for ``twistd skymapper``."""

    program = "skymapper"
    synopsis = "[options]"
    longdesc = (
        "Run an epmd-compatible port mapper. It listens on 127.0.0.1 unless --listen says "
        "otherwise: give --listen tcp:4369 to answer other hosts' lookups, as epmd does."
    )
    optParameters = [
        ["listen", None, None,
         "Endpoint to listen on (default tcp:$ERL_EPMD_PORT or tcp:4369, on 127.0.0.1)."],
        ["packet-timeout", None, 60,
         "Whole seconds an idle, unregistered connection may stay open (like epmd's "
         "-packet_timeout; at least 1).", _positive_int],
    ]
    optFlags = [
        ["relaxed-command-check", None,
         "Allow KILL and STOP (also set by ERL_EPMD_RELAXED_COMMAND_CHECK)."],
    ]


class NodeOptions(DaemonOptions):
    """Options for ``twistd skynode``."""

    program = "skynode"
    synopsis = "[options]"
    longdesc = (
        "Run one skyproto node: local services, and harbor links to the other nodes. "
        "Static peers (--peer) need no master."
    )
    optParameters = [
        ["harbor", None, None,
         "This node's harbor id, 1..255, or 'auto' to have the master assign one (required)."],
        ["name", None, None, "Node name, NAME or NAME@HOST (default: harborN@<short host>)."],
        ["mapper", None, None, "This host's port mapper (default tcp:127.0.0.1:"
         "$ERL_EPMD_PORT, or 4369); started in this process if none answers."],
        ["mapper-listen", None, None, "Where this node runs the mapper when none answers: "
         "an endpoint, or an interface address for the mapper's port (0.0.0.0: every "
         "interface, so other hosts can look up name@thishost). Default: where --mapper "
         "points (127.0.0.1), but every interface when --listen is on every interface."],
        ["gate", None, None,
         "Accept external clients here (e.g. tcp:8888:interface=127.0.0.1)."],
        ["gate-framing", None, "line",
         "Client framing: line (newline-terminated UTF-8) or packet (2-byte length)."],
        ["gate-service", None, "SIMPLEDB", "The service that gate requests go to."],
        ["gate-max-clients", None, 1000, "Most clients at once.", _positive_int],
        ["gate-max-request", None, 4096, "Longest request line or packet, in bytes.",
         _positive_int],
        ["master-listen", None, None, "With --standalone: where its master listens "
         "(default tcp:2013:interface=127.0.0.1)."],
        ["listen", None, "tcp:0:interface=127.0.0.1",
         "Endpoint where this node accepts harbor links."],
        ["advertise", None, None, "The endpoint other nodes dial to reach --listen (default: "
         "its address; the host name when it listens on every interface)."],
        ["secret-file", None, "~/.skyproto.cookie",
         "Cluster secret (created with mode 0600 if missing)."],
        ["tls-dir", None, None, TLS_DIR_HELP],
        ["timeout", None, 10.0, "Default call timeout in seconds.", _positive_float],
        ["heartbeat-interval", None, 1.0, "Seconds between heartbeats.", _positive_float],
        ["heartbeat-timeout", None, 3.0, "Seconds of silence before a peer is down.",
         _positive_float],
        ["max-frame", None, DEFAULT_MAX_FRAME, "Largest frame in bytes.", _positive_int],
        ["master-wait", None, None, "With --master: exit with status 1 if no master has "
         "welcomed this node within this many seconds of start (default: keep trying).",
         _positive_float],
    ]

    optFlags = [
        ["no-mapper", None, "Do not register with this host's port mapper."],
        ["standalone", None, "Run a master, mapper, node, gate and SIMPLEDB in this one "
         "process (loopback-only defaults; other nodes can join its master)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["peers"] = []
        self["services"] = []
        self["master"] = None
        self["masters"] = []
        self["groups"] = []

    def opt_master(self, value: str) -> None:
        """Endpoint of the master, e.g. tcp:127.0.0.1:2013; repeatable: masters that share
        one store (--store etcd:), talked to one at a time, the next when one is lost."""
        self["masters"].append(value)
        self["master"] = self["master"] or value

    def opt_peer(self, value: str) -> None:
        """HARBOR=ENDPOINT or HARBOR=NAME@HOST: a static peer, e.g. 2=tcp:127.0.0.1:7002
        or 2=beta@db1 (found through db1's port mapper); repeatable."""
        harbor, equals, endpoint = value.partition("=")
        if not equals or not endpoint:
            raise usage.UsageError(f"--peer takes HARBOR=ENDPOINT, not {value!r}")
        try:
            self["peers"].append((check_harbor(int(harbor)), endpoint))
        except (ValueError, AddressError):
            raise usage.UsageError(f"--peer {value!r}: harbor must be 1..255") from None

    def opt_service(self, value: str) -> None:
        """A built-in service (echo, relay, simpledb) or package.module:Class, a subclass of
        skyproto.node.service.Service (repeatable)."""
        self["services"].append(value)

    def opt_join_group(self, value: str) -> None:
        """Put every --service of this node in this service group (repeatable): callers
        use node.call_group, and a gate whose --gate-service names the group spreads its
        requests over the members."""
        if not value or any(c.isspace() for c in value) or len(value.encode()) > 255:
            raise usage.UsageError(f"--join-group takes a group name (no spaces), "
                                   f"not {value!r}")
        self["groups"].append(value)

    def postOptions(self) -> None:
        """Check the options together and fill in what ``--standalone`` implies."""
        if self["standalone"]:
            if self["master"] is not None:
                raise usage.UsageError("--standalone runs its own master: give --master-listen")
            self["harbor"] = self["harbor"] or "1"
            self["name"] = self["name"] or "standalone"
            self["gate"] = self["gate"] or "tcp:8888:interface=127.0.0.1"
            self["master-listen"] = self["master-listen"] or "tcp:2013:interface=127.0.0.1"
            self["master"] = "(this process)"
            if "simpledb" not in self["services"]:
                self["services"].append("simpledb")
        elif self["master-listen"] is not None:
            raise usage.UsageError("--master-listen goes with --standalone")
        if self["master-wait"] is not None and not self["masters"]:
            raise usage.UsageError("--master-wait goes with --master")
        if self["gate-framing"] not in FRAMINGS:
            raise usage.UsageError(f"--gate-framing must be one of {', '.join(FRAMINGS)}")
        if self["harbor"] is None:
            raise usage.UsageError("--harbor is required")
        if self["harbor"] == "auto":
            if self["master"] is None:
                raise usage.UsageError("--harbor auto needs --master (the master assigns it)")
            self["harbor"] = 0
        else:
            try:
                self["harbor"] = check_harbor(int(self["harbor"]))
            except (ValueError, AddressError):
                raise usage.UsageError(
                    f"--harbor must be 'auto' or an integer from 1 to 255, "
                    f"not {self['harbor']!r}"
                ) from None
        name = self["name"] or (f"harbor{self['harbor']}" if self["harbor"] else
                                f"node{os.getpid()}")
        try:
            self["node_name"] = NodeName.parse(name)
        except AddressError as e:
            raise usage.UsageError(f"--name: {e}") from None
        if self["heartbeat-timeout"] <= self["heartbeat-interval"]:
            raise usage.UsageError("--heartbeat-timeout must be longer than --heartbeat-interval")


def describe_address(port: IListeningPort, listen: str | None = None) -> str:
    """Where peers can reach a listening port, as a client endpoint string, in the scheme
    it really listens with (``listen``, its endpoint string: ``ssl:``, ``skytls:``...)."""
    host = port.getHost()
    if isinstance(host, IPv4Address | IPv6Address):
        return listener_client_endpoint(listen, host.host, host.port)
    if isinstance(host, UNIXAddress):
        name = host.name.decode() if isinstance(host.name, bytes) else host.name
        return f"unix:{name}"
    return str(host)


def advertised_address(port: IListeningPort, listen: str | None = None,
                       toward: str | Sequence[str] | None = None) -> str:
    """Where other nodes reach a listening port: its address; when it listens on every
    interface (0.0.0.0 or ::), which no peer can dial, the address this host reaches
    ``toward`` (the master's endpoint) from, else the host's name."""
    address = describe_address(port, listen)
    host = port.getHost()
    if isinstance(host, IPv4Address | IPv6Address) and is_wildcard_interface(host.host):
        masters = [toward] if isinstance(toward, str) else list(toward or [])
        targets = [target for target in map(_master_host, masters) if target is not None]
        local = next(filter(None, map(route_source_address, targets)), None)
        return listener_client_endpoint(listen, local or socket.getfqdn(), host.port)
    return address


def _master_host(master: str) -> str | None:
    """The host a master endpoint dials (``tcp:hosta:2013``, ``skymaster@hosta``)."""
    if is_node_name(master):
        return NodeName.parse(master).host
    return endpoint_host(master)


def route_source_address(host: str) -> str | None:
    """The local address this host's packets to ``host`` leave from (the route lookup
    ``ip route get`` does: a UDP socket's connect, which sends nothing); None if ``host``
    does not resolve or has no route."""
    try:
        found = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    for family, kind, proto, _, where in found:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.connect(where)
                local: str = probe.getsockname()[0]
                return local
        except OSError:
            continue
    return None


def listen_at_once(listening: Deferred[IListeningPort], what: str,
                   program: str) -> IListeningPort | Failure:
    """The result of a listen that endpoints like tcp: and unix: complete at once."""
    box: list[IListeningPort | Failure] = []
    listening.addBoth(box.append)
    if not box:
        exit_with(f"{what} did not start listening at once", program)
    return box[0]


def listen_now(listening: Deferred[IListeningPort], what: str, program: str) -> IListeningPort:
    """The listening port, or exit with one line saying why there is none."""
    result = listen_at_once(listening, what, program)
    if isinstance(result, Failure):
        exit_with(f"cannot listen on {what}: {result.getErrorMessage()}", program)
    return result


def already_in_use(result: IListeningPort | Failure) -> bool:
    """Whether a listen failed because the address is in use (another mapper holds the port)."""
    error = result.value if isinstance(result, Failure) else None
    return isinstance(error, CannotListenError) and getattr(
        error.socketError, "errno", None) == errno.EADDRINUSE


def exit_after_shutdown(reactor: Any, message: str, program: str) -> None:
    """A fatal condition found while running (e.g. the master refused us): one line on the
    real stderr (once twistd logs, ``sys.stderr`` is its log), stop the reactor, and exit
    1 (twistd itself always exits 0). Before the reactor runs, it stops once it does."""
    real_stderr = sys.__stderr__ or sys.stderr
    print(f"{program}: error: {message}", file=real_stderr, flush=True)

    def leave() -> None:
        sys.stdout.flush()
        real_stderr.flush()
        os._exit(1)

    reactor.addSystemEventTrigger("after", "shutdown", leave)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


class MasterWait(Service):
    """``--master-wait``: if no master has welcomed the node ``seconds`` after start,
    ``give_up`` is called with one line saying so (and why the last attempt failed)."""

    def __init__(self, clock: IReactorTime, client: Callable[[], MasterClient | None],
                 seconds: float, give_up: Callable[[str], object]) -> None:
        self.clock = clock
        self.client = client
        self.seconds = seconds
        self.give_up = give_up
        self._check: IDelayedCall | None = None

    def startService(self) -> None:
        """Start the ``--master-wait`` countdown."""
        super().startService()  # type: ignore[no-untyped-call]
        self._check = self.clock.callLater(self.seconds, self._expired)

    def stopService(self) -> None:
        """Stop the countdown."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None

    def _expired(self) -> None:
        self._check = None
        client = self.client()
        if client is not None and client.welcomes:
            return
        last = client.last_failure if client is not None else None
        if last is None and client is not None:
            last = f"{client.endpoint_description}: still trying"
        why = f" (last attempt: {last})" if last else ""
        self.give_up(f"no master answered within {self.seconds:g} s{why}")


def check_client_endpoint(reactor: Any, option: str, endpoint: str,
                          given: str | None = None,
                          forms: str = "tcp:HOST:PORT or unix:PATH") -> None:
    """ConfigurationError naming ``option`` unless ``endpoint`` is a client endpoint
    (``given``: the option's whole value, when the endpoint is only part of it)."""
    try:
        clientFromString(reactor, endpoint)
    except (ValueError, KeyError, TypeError) as e:
        what = f"{option} {given}: {endpoint!r} is" if given else f"{option} {endpoint!r} is"
        raise ConfigurationError(
            f"{what} not a client endpoint ({e}); write e.g. {forms}") from None


def check_service_class(spec: str) -> type[NodeServiceBase]:
    """The class ``--service spec`` names; ConfigurationError unless it is a service."""
    try:
        cls = load_service_class(spec)
    except ConfigurationError as e:
        raise ConfigurationError(f"--service: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, NodeServiceBase)):
        raise ConfigurationError(
            f"--service {spec}: {getattr(cls, '__qualname__', cls)!s} is not a skyproto "
            "service (a subclass of skyproto.node.service.Service)")
    return cls


def check_gate_target(node: Node, target: str, known: Iterable[str]) -> None:
    """Warn when the gate's ``--gate-service`` is neither a name this node knows nor a
    service group: every gate request would fail (each one says which names exist)."""
    names = sorted(set(known))
    if target in names or node.group_members(target):
        return
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    log.warn("the gate's service {target} is not running: no node has that name or group, "
             "so gate requests fail until one registers it ({names})", target=target,
             names=f"names: {shown}" if names else "no names are known")


class NodeService(Service):
    """Runs a Node: dials the static peers and joins the master at start; stops the node."""

    def __init__(self, node: Node, peers: list[tuple[int, str]],
                 join: Callable[[], object] | None = None) -> None:
        self.node = node
        self.peers = peers
        self.join = join
        self.host_mapper: HostMapper | None = None

    def startService(self) -> None:
        """Link the static peers and join the master."""
        super().startService()  # type: ignore[no-untyped-call]
        for harbor, endpoint in self.peers:
            self.node.add_peer(harbor, endpoint)
        if self.join is not None:
            self.join()

    def stopService(self) -> Deferred[Any]:
        """Stop the node (links closed, calls failed) and its mapper agent."""
        super().stopService()  # type: ignore[no-untyped-call]
        stopping = [self.node.stop()]
        if self.host_mapper is not None:
            stopping.append(self.host_mapper.stop())
        return gatherResults(stopping)


def mapper_listen_endpoint(connect: str) -> str:
    """Where to listen when this node must host the mapper it could not reach."""
    kind, args, kwargs = parse_endpoint_description(connect)
    if kind == "tcp":
        host = kwargs.get("host") or (args[0] if args else "")
        port = kwargs.get("port") or (args[1] if len(args) > 1 else "")
        if host and port:
            return f"tcp:{port}:interface={host}"
    elif kind == "unix" and (args or "path" in kwargs):
        return f"unix:{kwargs.get('path') or args[0]}:mode=600:lockfile=1"
    elif kind == "loopback":
        return connect
    raise ConfigurationError(
        f"--mapper {connect!r}: use tcp:HOST:PORT, unix:PATH or loopback:NAME")


def hosted_mapper_endpoint(option: str | None, default: str, port_number: int,
                           harbor_port: IListeningPort) -> str:
    """Where this node listens when it hosts the mapper: ``--mapper-listen`` (an endpoint,
    or an interface address with the mapper's port), else ``default``; but on every
    interface, as epmd does, when the node itself listens on every interface and
    ``default`` is a ``tcp:`` port on loopback (so other hosts can ask it for us)."""
    if option:
        try:
            address = ipaddress.ip_address(option)
        except ValueError:
            return option
        return f"tcp:{port_number}:interface={quote_field(str(address))}"
    host = harbor_port.getHost()
    kind, args, kwargs = parse_endpoint_description(default)
    interface = kwargs.get("interface", "")
    if kind == "tcp" and isinstance(host, IPv4Address | IPv6Address) and \
            is_wildcard_interface(host.host) and _is_loopback(interface) and args:
        return f"tcp:{args[0]}"
    return default


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def make_node_service(options: NodeOptions) -> IService:
    """``twistd skynode``: the node, its listeners, master, mapper agent, gate and web, from the
    options (a mistake exits with one line)."""
    from twisted.internet import reactor

    program = "skynode"
    configure_tls(options, [
        ("--listen", options["listen"]), ("--master-listen", options["master-listen"]),
        *(("--master", master) for master in options["masters"]), ("--gate", options["gate"]),
        ("--advertise", options["advertise"]), ("--mapper", options["mapper"]),
        *(("--peer", endpoint) for _, endpoint in options["peers"])], program)
    top = MultiService()
    try:
        for master in options["masters"]:
            if not is_node_name(master):  # NAME@HOST: found through HOST's mapper
                check_client_endpoint(reactor, "--master", master,
                                      forms="tcp:HOST:PORT, unix:PATH or skymaster@HOST")
        for harbor, endpoint in options["peers"]:
            if not is_node_name(endpoint):
                check_client_endpoint(reactor, "--peer", endpoint, f"{harbor}={endpoint}",
                                      "tcp:HOST:PORT, unix:PATH or NAME@HOST")
        secret = load_secret(options["secret-file"])
        if options["standalone"]:
            master_port = start_master(reactor, secret, options["master-listen"], program,
                                       options["heartbeat-interval"],
                                       options["heartbeat-timeout"], option="--master-listen")
            ListeningService(master_port).setServiceParent(top)  # type: ignore[no-untyped-call]
            options["master"] = describe_address(master_port, options["master-listen"])
            options["masters"] = [options["master"]]
        port_number = mapper_port(os.environ)
        mapper_at = options["mapper"] or f"tcp:127.0.0.1:{port_number}"
        mapper_listen = mapper_listen_endpoint(mapper_at)
        node = Node(
            options["harbor"], reactor, secret,
            resolver=NodeResolver(reactor, port_number),
            default_timeout=options["timeout"],
            heartbeat_interval=options["heartbeat-interval"],
            heartbeat_timeout=options["heartbeat-timeout"],
            max_frame=options["max-frame"],
        )
        for harbor, _ in options["peers"]:
            if harbor == node.harbor:
                raise ConfigurationError(f"--peer {harbor}=...: that is this node's own harbor")
        services = []
        for spec in options["services"]:
            cls = check_service_class(spec)
            try:
                services.append(cls())
            except Exception as e:
                raise ConfigurationError(f"--service: cannot start service {spec!r}: "
                                         f"{e}") from None
        try:
            listening = node.listen(options["listen"])
        except ConfigurationError as e:
            raise ConfigurationError(f"--listen: {e}") from None
        port = listen_now(listening, options["listen"], program)
        mapper_listen = hosted_mapper_endpoint(options["mapper-listen"], mapper_listen,
                                               port_number, port)
        gate_port = None
        if options["gate"] is not None:
            gate = GateFactory(node, GateConfig(
                target=options["gate-service"], framing=options["gate-framing"],
                max_clients=options["gate-max-clients"],
                max_request=options["gate-max-request"]))
            gate_port = listen_now(
                listen_on(reactor, options["gate"], gate, program, "--gate"), options["gate"],
                program)
    except ConfigurationError as e:
        exit_with(str(e), program)
    address = options["advertise"] or advertised_address(
        port, options["listen"], toward=options["masters"] or options["master"])
    if options["advertise"] and not is_node_name(address):
        try:
            clientFromString(reactor, address)
        except (ValueError, KeyError, TypeError) as e:
            exit_with(f"--advertise {address!r} is not a client endpoint: {e}", program)
    if gate_port is not None:
        log.info("gate for {target} listening on {address} ({framing} framing)",
                 target=options["gate-service"],
                 address=describe_address(gate_port, options["gate"]),
                 framing=options["gate-framing"])
        ListeningService(gate_port).setServiceParent(top)  # type: ignore[no-untyped-call]
    node_service: NodeService

    def register_with_mapper(harbor: int) -> None:
        name = options["node_name"].name
        # advertised as name@host, the mapper is where that name is looked up: register
        # where we really listen, not the name (which would resolve to itself)
        registered = describe_address(port, options["listen"]) if is_node_name(address) \
            else address
        host_mapper = HostMapper(reactor, mapper_listen, mapper_at, port_number, name,
                                 registered, harbor, relaxed=relaxed_from_environ(os.environ))
        node_service.host_mapper = host_mapper
        host_mapper.start().addErrback(lambda failure: exit_after_shutdown(
            reactor, f"the name {name} seems to be in use by another node on this host: "
                     f"{failure.getErrorMessage()}", program))

    def started(harbor: int) -> None:
        if not options["no-mapper"]:
            register_with_mapper(harbor)
        def group_refused(failure: Failure, group: str) -> None:
            log.error("cannot join group {group}: {why}", group=group,
                      why=failure.getErrorMessage())

        for service in services:
            handle = node.spawn(service)
            for group in options["groups"]:
                node.join_group(group, handle).addErrback(group_refused, group)
        log.info(
            "skynode {node} is harbor {harbor}, incarnation {incarnation}, "
            "listening on {address}",
            node=str(options["node_name"]), harbor=harbor, incarnation=node.incarnation,
            address=address,
        )
        for name, handle in sorted(node.names.items()):
            log.info("name {name} is {handle}", name=name, handle=format_handle(handle))
        if gate_port is not None and options["master"] is None:
            check_gate_target(node, options["gate-service"], node.names)

    def check_gate_after_welcome(client: MasterClient) -> None:
        """With a master, the gate's service may live on any node: check once the first
        welcome brought the table (a master that never answers is logged already)."""
        def welcomed(_: object) -> None:
            # after the welcome is applied everywhere, including the group memberships
            reactor.callLater(0, lambda: check_gate_target(
                node, options["gate-service"], [*node.names, *client.names]))

        client.when_up(timeout=3600.0).addCallbacks(welcomed, lambda _: None)

    join = None
    if options["master"] is not None:
        masters = options["masters"]

        def refused(reason: str) -> None:
            # Refused for a real reason (id held by another node, secret, version): one
            # line on the real stderr (twistd's sys.stderr is its log), then exit 1.
            at = node.master.endpoint_description if node.master else masters[0]
            exit_after_shutdown(reactor, f"the master at {at} refused this node: {reason}",
                                program)

        def join() -> None:
            log.info("joining the master at {masters}", masters=", ".join(masters))
            try:
                client = node.join_master(
                    masters, str(options["node_name"]), address,
                    on_refused=refused, on_joined=None if node.harbor else started)
            except ConfigurationError as e:
                exit_after_shutdown(reactor, str(e), program)
                return
            if gate_port is not None:
                check_gate_after_welcome(client)

    node_service = NodeService(node, options["peers"], join)
    node_service.setServiceParent(top)  # type: ignore[no-untyped-call]
    if options["master-wait"] is not None:
        MasterWait(reactor, lambda: node.master, options["master-wait"],
                   lambda message: exit_after_shutdown(reactor, message, program),
                   ).setServiceParent(top)  # type: ignore[no-untyped-call]
    if node.harbor:
        started(node.harbor)
    if options["standalone"]:
        log.info(
            "skyproto standalone: master on {master}, harbor {harbor} on {address}, "
            "gate on {gate}, port mapper at {mapper}",
            master=options["master"], harbor=node.harbor, address=address,
            gate=describe_address(gate_port, options["gate"]) if gate_port is not None else "-",
            mapper="(none)" if options["no-mapper"] else mapper_at)
    return finish_daemon(reactor, options, program, top, lambda: node_web(
        node, reactor, host_mapper=lambda: node_service.host_mapper,
        gate=_factory_of(gate_port, GateFactory) if gate_port is not None else None,
        master=_factory_of(master_port, MasterService) if options["standalone"] else None))


def listen_on(reactor: Any, endpoint: str, factory: Any, program: str,
              option: str = "--listen") -> Deferred[IListeningPort]:
    """Start listening on ``endpoint`` (given as ``option``); a bad endpoint is one line.
    A mapper listens on TCP with its own accept loop (:mod:`skyproto.mapper.port`)."""
    try:
        if isinstance(factory, MapperServerFactory):
            server = mapper_server_endpoint(reactor, endpoint)
        else:
            server = serverFromString(reactor, endpoint)
    except (ValueError, KeyError, TypeError) as e:
        exit_with(f"{option}: bad listen endpoint {endpoint!r}: {e}", program)
    listening: Deferred[IListeningPort] = server.listen(factory)
    return listening


def start_master(reactor: Any, secret: bytes, endpoint: str, program: str,
                 heartbeat_interval: float, heartbeat_timeout: float,
                 registry: IRegistry | None = None, option: str = "--listen") -> IListeningPort:
    """A master listening on ``endpoint`` (given as ``option``), or one line and exit 1."""
    master = MasterService(registry or InMemoryRegistry(), reactor, secret,
                           heartbeat_interval=heartbeat_interval,
                           heartbeat_timeout=heartbeat_timeout)
    port = listen_now(listen_on(reactor, endpoint, master, program, option), endpoint, program)
    log.info("skymaster listening on {address}", address=describe_address(port, endpoint))
    return port


def make_master_service(options: MasterOptions) -> IService:
    """``twistd skymaster``: the master, its registry and listener (and web), from the options (a
    mistake exits with one line)."""
    from twisted.internet import reactor

    program = "skymaster"
    configure_tls(options, [("--listen", options["listen"]), ("--mapper", options["mapper"])],
                  program)
    try:
        secret = load_secret(options["secret-file"])
        port_number = mapper_port(os.environ)
        mapper_at = options["mapper"] or f"tcp:127.0.0.1:{port_number}"
        mapper_listen = mapper_listen_endpoint(mapper_at)
    except ConfigurationError as e:
        exit_with(str(e), program)
    registry = make_registry(reactor, options)
    port = start_master(reactor, secret, options["listen"], program,
                        options["heartbeat-interval"], options["heartbeat-timeout"], registry)
    master = MultiService()
    RegistryService(registry).setServiceParent(master)  # type: ignore[no-untyped-call]
    ListeningService(port).setServiceParent(master)  # type: ignore[no-untyped-call]
    if not options["no-mapper"]:
        try:
            host_mapper = HostMapper(
                reactor, hosted_mapper_endpoint(options["mapper-listen"], mapper_listen,
                                                port_number, port),
                # the port it listens on; with TLS on every interface, the host's name
                mapper_at, port_number, options["master_name"],
                advertised_address(port, options["listen"]), None, role=ROLE_MASTER,
                relaxed=relaxed_from_environ(os.environ))
        except ConfigurationError as e:
            exit_with(str(e), program)
        MasterMapperService(host_mapper).setServiceParent(master)  # type: ignore[no-untyped-call]
    return finish_daemon(reactor, options, program, master,
                         lambda: master_web(_factory_of(port, MasterService)))


def make_registry(reactor: Any, options: MasterOptions) -> IRegistry:
    """The store ``--store`` names: in memory, or in etcd."""
    urls = options["store"]
    if not urls:
        return InMemoryRegistry()
    client = EtcdClient.over_treq(urls, reactor)
    log.info("skymaster keeps its registry in etcd at {urls} (prefix {prefix}, leases of "
             "{ttl} s)", urls=",".join(urls), prefix=options["store-prefix"],
             ttl=options["store-lease-ttl"])
    return EtcdRegistry(client, reactor, prefix=options["store-prefix"],
                        lease_ttl=options["store-lease-ttl"])


class RegistryService(Service):
    """Starts the registry with the daemon (etcd: loads the table, watches, renews) and
    stops it with it (before the connections close: a stopping master releases nothing,
    its nodes re-join another master and keep their keys)."""

    def __init__(self, registry: IRegistry) -> None:
        self.registry = registry

    def startService(self) -> None:
        """Start the registry (load it, for etcd); a failure is logged."""
        super().startService()  # type: ignore[no-untyped-call]
        started: Deferred[None] = self.registry.start()
        started.addErrback(lambda failure: log.failure("the registry did not start", failure))

    def stopService(self) -> Deferred[None]:
        """Stop the registry (and close its etcd client)."""
        super().stopService()  # type: ignore[no-untyped-call]
        stopped: Deferred[None] = self.registry.stop()
        client = getattr(self.registry, "client", None)
        if isinstance(client, EtcdClient):
            stopped.addCallback(lambda _: client.close())
        return stopped


class MasterMapperService(Service):
    """Registers the master's name with its host's mapper (hosting the mapper if none
    answers, taking it over if it goes, as every node does) so that nodes find it as
    ``NAME@HOST``; unregisters when twistd stops. A name another live process holds is
    logged, not fatal: the master serves its endpoint all the same."""

    def __init__(self, host_mapper: HostMapper) -> None:
        self.host_mapper = host_mapper

    def startService(self) -> None:
        """Register the master's name with the host's mapper, so nodes can give ``--master
        name@host``."""
        super().startService()  # type: ignore[no-untyped-call]
        agent = self.host_mapper
        node = f"{agent.name}@{short_hostname()}"
        agent.start().addCallbacks(
            lambda _: log.info("registered as {node} with the mapper at {mapper}: nodes "
                               "join with --master {node}", node=node,
                               mapper=agent.connect_endpoint),
            lambda failure: log.error(
                "the name {name} is taken on this host's mapper at {mapper} (another "
                "master?); nodes cannot find this master as {node}: give it another --name "
                "({reason})", name=agent.name, mapper=agent.connect_endpoint, node=node,
                reason=failure.getErrorMessage()))

    def stopService(self) -> Deferred[None]:
        """Unregister from the mapper."""
        super().stopService()  # type: ignore[no-untyped-call]
        return self.host_mapper.stop()


class ListeningService(Service):
    """Stops listening when twistd stops."""

    def __init__(self, port: IListeningPort) -> None:
        self.port = port

    def stopService(self) -> Deferred[None] | None:
        """Stop listening."""
        super().stopService()  # type: ignore[no-untyped-call]
        return self.port.stopListening()


def make_mapper_service(options: MapperOptions) -> IService:
    """``twistd skymapper``: the port mapper on its port (exit 0 if another mapper already holds
    it)."""
    from twisted.internet import reactor

    program = "skymapper"
    try:
        port_number = mapper_port(os.environ)
    except ConfigurationError as e:
        exit_with(str(e), program)
    listen = options["listen"] or f"tcp:{port_number}:interface=127.0.0.1"
    factory = MapperServerFactory(
        reactor, port_number,
        relaxed=options["relaxed-command-check"] or relaxed_from_environ(os.environ),
        packet_timeout=options["packet-timeout"],
        on_kill=reactor.stop,
    )
    result = listen_at_once(listen_on(reactor, listen, factory, program), listen, program)
    if already_in_use(result):
        # epmd's own behaviour: another mapper already serves this host, and that is fine
        print(f"{program}: there is already a mapper running at {listen}", file=sys.stderr)
        raise SystemExit(0)
    if isinstance(result, Failure):
        exit_with(f"cannot listen on {listen}: {result.getErrorMessage()}", program)
    port = result
    host = port.getHost()
    if isinstance(host, IPv4Address | IPv6Address):
        factory.port = host.port  # NAMES must report the port we really listen on
    log.info("skymapper listening on {address} (relaxed command check: {relaxed})",
             address=describe_address(port), relaxed=factory.relaxed)
    return finish_daemon(reactor, options, program, ListeningService(port),
                         lambda: mapper_web(factory))


def _factory_of(port: IListeningPort, kind: type[Any]) -> Any:
    """The factory a port serves, unwrapped from TLS or other wrapping factories."""
    factory = getattr(port, "factory", None)
    for _ in range(8):
        if isinstance(factory, kind):
            return factory
        factory = getattr(factory, "wrappedFactory", None)
    raise ConfigurationError(f"--http: cannot find the {kind.__name__} behind its listener")


def finish_daemon(reactor: Any, options: DaemonOptions, program: str, service: IService,
                  web: Callable[[], Web]) -> IService:
    """The daemon's top service: ``service``, and with ``--http`` the web listener (made by
    ``web``); with ``--log-format json`` twistd logs JSON lines where it would log text."""
    observer = None
    if options["log-format"] == "json":
        twistd = getattr(options, "parent", None)
        if twistd is not None and (twistd.get("syslog") or twistd.get("logger")):
            exit_with("--log-format json writes where --logfile says (or to standard "
                      "output); it does not go with twistd's --syslog or --logger", program)
        try:
            observer = JSONLinesObserver(log_file(twistd))
        except OSError as e:
            exit_with(f"cannot open the log file: {e}", program)
    top = DaemonService(observer)
    service.setServiceParent(top)
    if options["http"] is not None:
        try:
            site = web()
        except ConfigurationError as e:
            exit_with(str(e), program)
        endpoint = options["http"]
        port = listen_now(listen_on(reactor, endpoint, site.site, program, "--http"), endpoint,
                          program)
        address = describe_address(port)
        log.info("{what} on {url} ({address})",
                 what="cluster page, /metrics and /health" if site.has_page else
                 "/metrics and /health", url=http_url(address) or address, address=address)
        site.service().setServiceParent(top)  # type: ignore[no-untyped-call]
        ListeningService(port).setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
