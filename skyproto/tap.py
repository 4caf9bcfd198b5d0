"""twistd service makers: the only place that builds services from command-line options.

Every user mistake ends in one line on stderr and exit status 1, never a traceback: option
errors are caught in :meth:`OneLineOptions.parseOptions`, configuration errors (secret
file, endpoints, services, a port already taken) in the ``make_*`` functions.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from twisted.application.service import IService, MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from .address import NodeName, check_harbor, format_handle
from .auth import load_secret
from .endpoints import is_node_name, parse_endpoint_description
from .errors import AddressError, ConfigurationError
from .gate import FRAMINGS, GateConfig, GateFactory
from .mapper.epmd import DEFAULT_PORT as EPMD_PORT
from .mapper.server import MapperServerFactory, relaxed_from_environ
from .master.registry import InMemoryRegistry
from .master.server import MasterService
from .node.host_mapper import HostMapper
from .node.node import Node
from .node.resolver import NodeResolver
from .services import load_service_class
from .wire.framing import DEFAULT_MAX_FRAME

log = Logger()


def exit_with(message: str, program: str) -> NoReturn:
    """Print one line saying what is wrong and exit non-zero: no traceback for users."""
    print(f"{program}: error: {message}", file=sys.stderr)
    raise SystemExit(1)


class OneLineOptions(usage.Options):
    """Options whose errors are one line on stderr (twistd would print the whole help)."""

    program = "skyproto"

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            exit_with(f"{e} (see: twistd {self.program} --help)", self.program)


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


class MasterOptions(OneLineOptions):
    """Options for ``twistd skymaster``."""

    program = "skymaster"
    synopsis = "[options]"
    longdesc = ("Run the master name service: harbor id -> node, global name -> handle, "
                "pushed to every node. Nodes re-register by themselves after a restart.")
    optParameters = [
        ["listen", None, "tcp:2013:interface=127.0.0.1", "Endpoint to listen on."],
        ["secret-file", None, "~/.skyproto.cookie",
         "Cluster secret (created with mode 0600 if missing)."],
        ["heartbeat-interval", None, 1.0, "Seconds between heartbeats.", _positive_float],
        ["heartbeat-timeout", None, 3.0, "Seconds of silence before a node is down.",
         _positive_float],
    ]

    def postOptions(self) -> None:
        if self["heartbeat-timeout"] <= self["heartbeat-interval"]:
            raise usage.UsageError("--heartbeat-timeout must be longer than --heartbeat-interval")


def mapper_port(environ: Mapping[str, str]) -> int:
    """The mapper's port: ``ERL_EPMD_PORT`` if set (as epmd and erl read it), else 4369."""
    text = environ.get("ERL_EPMD_PORT", "")
    if not text:
        return EPMD_PORT
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigurationError(f"ERL_EPMD_PORT must be a port number, not {text!r}")
    return int(text)


class MapperOptions(OneLineOptions):
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


class NodeOptions(OneLineOptions):
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
        ["master", None, None, "Endpoint of the master, e.g. tcp:127.0.0.1:2013."],
        ["mapper", None, None, "This host's port mapper (default tcp:127.0.0.1:"
         "$ERL_EPMD_PORT, or 4369); started in this process if none answers."],
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
        ["timeout", None, 10.0, "Default call timeout in seconds.", _positive_float],
        ["heartbeat-interval", None, 1.0, "Seconds between heartbeats.", _positive_float],
        ["heartbeat-timeout", None, 3.0, "Seconds of silence before a peer is down.",
         _positive_float],
        ["max-frame", None, DEFAULT_MAX_FRAME, "Largest frame in bytes.", _positive_int],
    ]

    optFlags = [
        ["no-mapper", None, "Do not register with this host's port mapper."],
        ["standalone", None, "Run a master, mapper, node, gate and SIMPLEDB in this one "
         "process (loopback-only defaults; other nodes can join its master)."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["peers"] = []
        self["services"] = []

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
        """A built-in service (echo, relay) or package.module:Class (repeatable)."""
        self["services"].append(value)

    def postOptions(self) -> None:
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


def describe_address(port: IListeningPort) -> str:
    """Where peers can reach a listening port, as a client endpoint string."""
    host = port.getHost()
    if isinstance(host, IPv4Address):
        return f"tcp:{host.host}:{host.port}"
    if isinstance(host, IPv6Address):
        return f"tcp:host={host.host.replace(':', chr(92) + ':')}:port={host.port}"
    if isinstance(host, UNIXAddress):
        name = host.name.decode() if isinstance(host.name, bytes) else host.name
        return f"unix:{name}"
    return str(host)


def advertised_address(port: IListeningPort) -> str:
    """Where other nodes reach a listening port: its address, but the host's name when it
    listens on every interface (0.0.0.0 or ::), which no peer can dial."""
    address = describe_address(port)
    host = port.getHost()
    if isinstance(host, IPv4Address | IPv6Address) and host.host in ("0.0.0.0", "::"):
        return f"tcp:{socket.getfqdn()}:{host.port}"
    return address


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
    error = result.value if isinstance(result, Failure) else None
    return isinstance(error, CannotListenError) and getattr(
        error.socketError, "errno", None) == errno.EADDRINUSE


def exit_after_shutdown(reactor: Any, message: str, program: str) -> None:
    """A fatal condition found while running (e.g. the master refused us): one line on
    stderr, stop the reactor, and exit 1 (twistd itself always exits 0)."""
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    reactor.addSystemEventTrigger("after", "shutdown", leave)
    reactor.stop()


class NodeService(Service):
    """Runs a Node: dials the static peers and joins the master at start; stops the node."""

    def __init__(self, node: Node, peers: list[tuple[int, str]],
                 join: Callable[[], object] | None = None) -> None:
        self.node = node
        self.peers = peers
        self.join = join
        self.host_mapper: HostMapper | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        for harbor, endpoint in self.peers:
            self.node.add_peer(harbor, endpoint)
        if self.join is not None:
            self.join()

    def stopService(self) -> Deferred[Any]:
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


def make_node_service(options: NodeOptions) -> IService:
    from twisted.internet import reactor

    program = "skynode"
    top = MultiService()
    try:
        secret = load_secret(options["secret-file"])
        if options["standalone"]:
            master_port = start_master(reactor, secret, options["master-listen"], program,
                                       options["heartbeat-interval"],
                                       options["heartbeat-timeout"])
            ListeningService(master_port).setServiceParent(top)  # type: ignore[no-untyped-call]
            options["master"] = describe_address(master_port)
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
            cls = load_service_class(spec)
            try:
                services.append(cls())
            except Exception as e:
                raise ConfigurationError(f"cannot start service {spec!r}: {e}") from None
        port = listen_now(node.listen(options["listen"]), options["listen"], program)
        gate_port = None
        if options["gate"] is not None:
            gate = GateFactory(node, GateConfig(
                target=options["gate-service"], framing=options["gate-framing"],
                max_clients=options["gate-max-clients"],
                max_request=options["gate-max-request"]))
            gate_port = listen_now(listen_on(reactor, options["gate"], gate, program),
                                   options["gate"], program)
    except ConfigurationError as e:
        exit_with(str(e), program)
    address = options["advertise"] or advertised_address(port)
    if options["advertise"] and not is_node_name(address):
        try:
            clientFromString(reactor, address)
        except (ValueError, KeyError, TypeError) as e:
            exit_with(f"--advertise {address!r} is not a client endpoint: {e}", program)
    if gate_port is not None:
        log.info("gate for {target} listening on {address} ({framing} framing)",
                 target=options["gate-service"], address=describe_address(gate_port),
                 framing=options["gate-framing"])
        ListeningService(gate_port).setServiceParent(top)  # type: ignore[no-untyped-call]
    node_service: NodeService

    def register_with_mapper(harbor: int) -> None:
        name = options["node_name"].name
        host_mapper = HostMapper(reactor, mapper_listen, mapper_at, port_number, name, address,
                                 harbor, relaxed=relaxed_from_environ(os.environ))
        node_service.host_mapper = host_mapper
        host_mapper.start().addErrback(lambda failure: exit_after_shutdown(
            reactor, f"the name {name} seems to be in use by another node on this host: "
                     f"{failure.getErrorMessage()}", program))

    def started(harbor: int) -> None:
        if not options["no-mapper"]:
            register_with_mapper(harbor)
        for service in services:
            node.spawn(service)
        log.info(
            "skynode {node} is harbor {harbor}, incarnation {incarnation}, "
            "listening on {address}",
            node=str(options["node_name"]), harbor=harbor, incarnation=node.incarnation,
            address=address,
        )
        for name, handle in sorted(node.names.items()):
            log.info("name {name} is {handle}", name=name, handle=format_handle(handle))

    join = None
    if options["master"] is not None:
        master_endpoint = options["master"]

        def refused(reason: str) -> None:
            # Refused for a real reason (id held by another node, secret, version): one
            # line on the real stderr (twistd's sys.stderr is its log), then exit 1.
            message = f"the master at {master_endpoint} refused this node: {reason}"
            real_stderr = sys.__stderr__ or sys.stderr
            print(f"{program}: error: {message}", file=real_stderr, flush=True)

            def leave() -> None:
                sys.stdout.flush()
                os._exit(1)

            reactor.addSystemEventTrigger("after", "shutdown", leave)
            reactor.stop()

        def join() -> None:
            try:
                node.join_master(
                    master_endpoint, str(options["node_name"]), address,
                    on_refused=refused, on_joined=None if node.harbor else started)
            except ConfigurationError as e:
                exit_after_shutdown(reactor, str(e), program)

    node_service = NodeService(node, options["peers"], join)
    node_service.setServiceParent(top)  # type: ignore[no-untyped-call]
    if node.harbor:
        started(node.harbor)
    if options["standalone"]:
        log.info(
            "skyproto standalone: master on {master}, harbor {harbor} on {address}, "
            "gate on {gate}, port mapper at {mapper}",
            master=options["master"], harbor=node.harbor, address=address,
            gate=describe_address(gate_port) if gate_port is not None else "-",
            mapper="(none)" if options["no-mapper"] else mapper_at)
    return top


def listen_on(reactor: Any, endpoint: str, factory: Any,
              program: str) -> Deferred[IListeningPort]:
    try:
        server = serverFromString(reactor, endpoint)
    except (ValueError, KeyError, TypeError) as e:
        exit_with(f"bad listen endpoint {endpoint!r}: {e}", program)
    listening: Deferred[IListeningPort] = server.listen(factory)
    return listening


def start_master(reactor: Any, secret: bytes, endpoint: str, program: str,
                 heartbeat_interval: float, heartbeat_timeout: float) -> IListeningPort:
    master = MasterService(InMemoryRegistry(), reactor, secret,
                           heartbeat_interval=heartbeat_interval,
                           heartbeat_timeout=heartbeat_timeout)
    port = listen_now(listen_on(reactor, endpoint, master, program), endpoint, program)
    log.info("skymaster listening on {address}", address=describe_address(port))
    return port


def make_master_service(options: MasterOptions) -> IService:
    from twisted.internet import reactor

    program = "skymaster"
    try:
        secret = load_secret(options["secret-file"])
    except ConfigurationError as e:
        exit_with(str(e), program)
    return ListeningService(start_master(reactor, secret, options["listen"], program,
                                         options["heartbeat-interval"],
                                         options["heartbeat-timeout"]))


class ListeningService(Service):
    """Stops listening when twistd stops."""

    def __init__(self, port: IListeningPort) -> None:
        self.port = port

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.port.stopListening()


def make_mapper_service(options: MapperOptions) -> IService:
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
    return ListeningService(port)
