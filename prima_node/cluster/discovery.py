"""Finding the nodes of a home cluster with mDNS/DNS-SD (zeroconf), so nobody types addresses.

Every node advertises one DNS-SD service of type ``_prima._tcp.local.``; the head browses for
them, and Home Assistant's integration finds nodes through its zeroconf matcher on the same type.
Where multicast does not reach (other subnets, VPNs, containers without host networking) the
``--peer HOST:PORT`` route still works: discovery is a convenience, never a requirement, so every
failure to set it up is a logged warning, not an error.

The service (a public contract: Home Assistant and other tools read it)
-----------------------------------------------------------------------
- Instance name: the node id, so ``<node id>._prima._tcp.local.``; host name (SRV target)
  ``prima-<node id>.local.`` (not the machine's own host name, which an OS responder such as
  Avahi may already answer for). SRV port: the node's HTTP port, where both its cluster endpoint
  (``path``) and its HTTP API listen. A/AAAA records: the addresses the node is reachable on.
- TTLs are 120 s for every record (not DNS-SD's usual 75 minutes for PTR/TXT), so a node that
  dies without saying goodbye drops out of browsers' lists within about two minutes.
- TXT properties (keys in lower case, values UTF-8; every key is present unless marked optional):

  ======== ====================================================================================
  txtvers  ``1``: the version of this TXT layout. A reader must ignore services of a version it
           does not know; new optional keys may appear without a version change.
  id       the node id: stable across restarts (``<state dir>/node-id``), at most 57 characters
           out of ``A-Z a-z 0-9 _ -``. Home Assistant's unique id for the device.
  name     a human-readable name (the host name), at most 100 bytes.
  version  the node software's version (``prima_node.__version__``).
  role     ``head`` (serves the OpenAI-compatible API for the cluster), ``worker`` (runs layer
           windows for a head, no API of its own) or ``standalone`` (a single node serving the
           API by itself, no cluster).
  model    the model file's name (no directory), at most 200 bytes.
  size     the model file's size in bytes (decimal).
  hash     the model fingerprint (``prima_node.cluster.fingerprint``: lower-case hex, 32 digits
           today): nodes of one cluster must show the same ``size`` and ``hash``.
  api      the TCP port of the node's HTTP API (``/v1``, ``/api/status``, ``/health``); today
           always the SRV port.
  path     the HTTP path of the node's cluster websocket endpoint (``/cluster/ws``).
  cluster  optional: a cluster id, so several clusters on one network can tell their nodes
           apart; at most 64 characters out of ``A-Z a-z 0-9 _ . -``.
  ======== ====================================================================================

A browser skips (and logs once) any ``_prima._tcp`` service whose TXT breaks these rules: an
unknown ``txtvers``, a missing key, a value out of range or not UTF-8.

Which interfaces
----------------
mDNS runs on the interfaces the node's HTTP server is reachable on: bound to one address (such as
``127.0.0.1``), the node advertises only that address and zeroconf uses only that interface;
bound to ``0.0.0.0`` (or ``::``), it uses every interface that is up and multicast-capable and
advertises their addresses other than loopback ones. An interface without the MULTICAST flag (a
plain ``lo`` on Linux) cannot carry mDNS, so a node bound to such an address logs a warning and
runs without discovery.

Everything here runs on the caller's asyncio event loop (zeroconf attaches to it, no thread of
its own) and blocking work (reading the interface list, resolving a host name) goes to the
loop's default executor, so it can live in aiohttp's startup and cleanup hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import re
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ifaddr
from zeroconf import Error as ZeroconfError
from zeroconf import IPVersion, NonUniqueNameException, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

_LOG = logging.getLogger("prima.cluster.discovery")

SERVICE_TYPE = "_prima._tcp.local."
TXT_VERSION = "1"
ROLES = ("head", "worker", "standalone")
DEFAULT_PATH = "/cluster/ws"  # prima_node.cluster.node.RING_PATH (not imported: it pulls aiohttp)
TTL_S = 120
RESOLVE_TIMEOUT_MS = 3000

Change = Literal["added", "updated", "removed"]
OnChange = Callable[[Change, "DiscoveredNode"], None]

_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,57}")
_CLUSTER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HASH = re.compile(r"[0-9a-f]{16,64}")
_DECIMAL = re.compile(r"[0-9]{1,20}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_NAME_BYTES = 100
_MAX_MODEL_BYTES = 200
_REQUIRED_KEYS = ("id", "name", "version", "role", "model", "size", "hash", "api", "path")

# Linux interface flags (<linux/if.h>) and the ioctl that reads them; an ioctl rather than
# /sys/class/net because sysfs shows the interfaces of the network namespace that mounted it,
# which need not be this process's.
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFF_MULTICAST = 0x1000


def _package_version() -> str:
    from .. import __version__

    return __version__


def _text(field_name: str, value: object, max_bytes: int) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field_name} must be a non-empty string, got {value!r}")
    if len(value.encode()) > max_bytes:
        raise ValueError(f"{field_name} is longer than {max_bytes} bytes: {value!r}")
    if _CONTROL.search(value):
        raise ValueError(f"{field_name} contains control characters: {value!r}")


@dataclass(frozen=True, kw_only=True)
class NodeAnnouncement:
    """What a node says about itself in its TXT record (the fields of the module docstring).

    Validated on construction, so a node cannot advertise what browsers would reject and a
    browser can build one straight from a peer's TXT (``from_properties``).
    """

    node_id: str
    name: str
    role: str
    model: str
    size: int
    hash: str
    api_port: int
    version: str = field(default_factory=_package_version)
    path: str = DEFAULT_PATH
    cluster: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not _NODE_ID.fullmatch(self.node_id):
            raise ValueError(f"node id must be 1-57 characters out of A-Z a-z 0-9 _ -, "
                             f"got {self.node_id!r}")
        _text("name", self.name, _MAX_NAME_BYTES)
        _text("version", self.version, 32)
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        _text("model", self.model, _MAX_MODEL_BYTES)
        if "/" in self.model:
            raise ValueError(f"model must be a file name, not a path: {self.model!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"size must be a non-negative integer, got {self.size!r}")
        if not isinstance(self.hash, str) or not _HASH.fullmatch(self.hash):
            raise ValueError(f"hash must be 16-64 lower-case hex digits, got {self.hash!r}")
        if (isinstance(self.api_port, bool) or not isinstance(self.api_port, int)
                or not 1 <= self.api_port <= 65535):
            raise ValueError(f"api port must be 1-65535, got {self.api_port!r}")
        _text("path", self.path, 100)
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")
        if self.cluster is not None and (not isinstance(self.cluster, str)
                                         or not _CLUSTER_ID.fullmatch(self.cluster)):
            raise ValueError(f"cluster id must be 1-64 characters out of A-Z a-z 0-9 _ . -, "
                             f"got {self.cluster!r}")

    @classmethod
    def from_model(cls, model_path: str | Path, *, node_id: str, name: str, role: str,
                   api_port: int, cluster: str | None = None) -> NodeAnnouncement:
        """The announcement for a node serving ``model_path``.

        Blocking (it stats the file and, the first time, fingerprints it): call it in an
        executor. A name or file name too long for a TXT entry is shortened rather than refused,
        since the ``hash`` is what identifies the model.
        """
        from .fingerprint import fingerprint

        path = Path(model_path)
        return cls(node_id=node_id, name=_shorten(name, _MAX_NAME_BYTES), role=role,
                   model=_shorten(path.name, _MAX_MODEL_BYTES), size=path.stat().st_size,
                   hash=fingerprint(path), api_port=api_port, cluster=cluster)

    def properties(self) -> dict[str, str]:
        """The TXT properties, in the layout of the module docstring."""
        props = {"txtvers": TXT_VERSION, "id": self.node_id, "name": self.name,
                 "version": self.version, "role": self.role, "model": self.model,
                 "size": str(self.size), "hash": self.hash, "api": str(self.api_port),
                 "path": self.path}
        if self.cluster is not None:
            props["cluster"] = self.cluster
        return props

    @staticmethod
    def fields_from_properties(props: Mapping[bytes, bytes | None]) -> dict[str, Any]:
        """The constructor's keyword arguments from raw TXT properties; ``ValueError`` if they
        break the layout (unknown txtvers, missing key, not UTF-8, not a number)."""
        txt: dict[str, str] = {}
        for raw_key, raw_value in props.items():
            try:
                key = raw_key.decode("ascii").lower()
                value = None if raw_value is None else raw_value.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"TXT entry {raw_key!r} is not UTF-8") from None
            if value is not None:
                txt[key] = value
        if txt.get("txtvers") != TXT_VERSION:
            raise ValueError(f"unsupported txtvers {txt.get('txtvers')!r}")
        missing = [k for k in _REQUIRED_KEYS if k not in txt]
        if missing:
            raise ValueError(f"TXT lacks {', '.join(missing)}")
        for key in ("size", "api"):
            if not _DECIMAL.fullmatch(txt[key]):
                raise ValueError(f"TXT {key} is not a decimal number: {txt[key]!r}")
        return {"node_id": txt["id"], "name": txt["name"], "version": txt["version"],
                "role": txt["role"], "model": txt["model"], "size": int(txt["size"]),
                "hash": txt["hash"], "api_port": int(txt["api"]), "path": txt["path"],
                "cluster": txt.get("cluster")}

    @classmethod
    def from_properties(cls, props: Mapping[bytes, bytes | None]) -> NodeAnnouncement:
        """Parse and validate raw TXT properties (``ValueError`` if malformed)."""
        return cls(**cls.fields_from_properties(props))


@dataclass(frozen=True, kw_only=True)
class DiscoveredNode(NodeAnnouncement):
    """A node seen on the network: its announcement and where to reach it."""

    addresses: tuple[str, ...]  # IPv4 first, then IPv6 (link-local ones with %scope)
    port: int  # the SRV port: the HTTP port of the node
    server: str  # the SRV target host name, e.g. "prima-<id>.local."
    service_name: str  # the full DNS-SD instance name
    last_seen: float  # time.time() when its records last changed or were first resolved

    @property
    def address(self) -> str:
        """``host:port`` of its first address, as ``--peer`` takes it."""
        host = self.addresses[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The websocket URL of its cluster endpoint."""
        return f"ws://{self.address}{self.path}"

    def same_as(self, other: DiscoveredNode) -> bool:
        """Whether nothing but ``last_seen`` differs."""
        return dataclasses.replace(other, last_seen=self.last_seen) == self


def _shorten(text: str, max_bytes: int) -> str:
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes - 3].decode("utf-8", "ignore") + "\u2026"


# -- interfaces ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkPlan:
    """Which interfaces mDNS runs on (by address) and which addresses the node advertises."""

    interfaces: tuple[str, ...]
    addresses: tuple[str, ...]
    reason: str = ""  # why interfaces is empty


def _interface_flags(name: str) -> int | None:
    """Linux interface flags, or None where they cannot be read (other systems)."""
    if not sys.platform.startswith("linux"):
        return None
    import fcntl  # POSIX only

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, struct.pack("256s", name.encode()[:15]))
    except OSError:
        return None
    return int(struct.unpack_from("H", raw, 16)[0])


def _usable(flags: int | None) -> bool:
    return flags is None or (flags & _IFF_UP != 0 and flags & _IFF_MULTICAST != 0)


def _local_addresses() -> list[tuple[str, str, int | None]]:
    """(address, interface name, flags) of every IP address on this machine."""
    out: list[tuple[str, str, int | None]] = []
    for adapter in ifaddr.get_adapters():
        flags = _interface_flags(adapter.name)
        for ip in adapter.ips:
            if isinstance(ip.ip, tuple):
                addr, _flowinfo, scope = ip.ip
                out.append((f"{addr}%{scope}" if addr.startswith("fe80") else addr,
                            adapter.name, flags))
            else:
                out.append((ip.ip, adapter.name, flags))
    return out


def network_plan(host: str) -> NetworkPlan:
    """The interfaces and addresses for a node whose HTTP server binds ``host``.

    Blocking (reads the interface list, may resolve a host name): run it in an executor.
    """
    local = _local_addresses()
    if host in ("", "0.0.0.0", "::"):
        families = (4, 6) if host == "::" else (4,)
        usable = [(a, n, f) for a, n, f in local if _usable(f)]
        # mDNS itself runs over IPv4 only; the IPv6 addresses are advertised, not used.
        interfaces = [a for a, _, _ in usable if ipaddress.ip_address(a.split("%")[0]).version == 4]
        ads = [a for a, _, _ in usable
               if ipaddress.ip_address(a.split("%")[0]).version in families]
        remote = [a for a in ads if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
        if not interfaces:
            return NetworkPlan((), (), "no interface is up with multicast and an IPv4 address")
        return NetworkPlan(tuple(interfaces), tuple(remote or ads))
    try:
        targets = [str(ipaddress.ip_address(host))]
    except ValueError:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        targets = list(dict.fromkeys(str(info[4][0]) for info in infos))
    by_address = {a.split("%")[0]: (n, f) for a, n, f in local}
    chosen = []
    for target in targets:
        if target not in by_address:
            continue
        _name, flags = by_address[target]
        if _usable(flags):
            chosen.append(target)
    if not chosen:
        where = ", ".join(
            f"{t} ({by_address[t][0]} lacks MULTICAST or is down)" if t in by_address
            else f"{t} (on no local interface)" for t in targets)
        return NetworkPlan((), (), f"no multicast-capable interface carries {where}")
    v4 = [a for a in chosen if ipaddress.ip_address(a).version == 4]
    # zeroconf runs one IP version at a time for explicit interface lists: prefer IPv4.
    interfaces = v4 or chosen[:1]
    return NetworkPlan(tuple(interfaces), tuple(interfaces))


class Mdns:
    """One zeroconf instance on this node's interfaces, shared by its advertiser and browser.

    ``open`` returns None (after a warning) where multicast cannot be set up, so callers
    carry on without discovery.
    """

    def __init__(self, aiozc: AsyncZeroconf, plan: NetworkPlan) -> None:
        self.aiozc = aiozc
        self.plan = plan
        self._closed = False

    @property
    def addresses(self) -> tuple[str, ...]:
        """The addresses this node advertises."""
        return self.plan.addresses

    @classmethod
    async def open(cls, host: str = "0.0.0.0") -> Mdns | None:
        loop = asyncio.get_running_loop()
        try:
            plan = await loop.run_in_executor(None, network_plan, host)
        except OSError as exc:
            _LOG.warning("mDNS discovery is off: cannot resolve %s (%s); add nodes with "
                         "--peer HOST:PORT", host, exc)
            return None
        if not plan.interfaces:
            _LOG.warning("mDNS discovery is off: %s; add nodes with --peer HOST:PORT",
                         plan.reason)
            return None
        try:
            # use_asyncio: attach to this loop, never fall back to a thread of zeroconf's own.
            zc = Zeroconf(interfaces=list(plan.interfaces), use_asyncio=True)
        except (OSError, RuntimeError) as exc:
            _LOG.warning("mDNS discovery is off: cannot open the multicast sockets on %s (%s); "
                         "add nodes with --peer HOST:PORT", ", ".join(plan.interfaces), exc)
            return None
        aiozc = AsyncZeroconf(zc=zc)
        started = False
        with contextlib.suppress(Exception):
            await zc.async_wait_for_start(timeout=5.0)
            started = bool(zc.engine.senders)
        if not started:
            await aiozc.async_close()
            _LOG.warning("mDNS discovery is off: no multicast socket could be set up on %s; "
                         "add nodes with --peer HOST:PORT", ", ".join(plan.interfaces))
            return None
        _LOG.debug("mDNS on %s, advertising %s", ", ".join(plan.interfaces),
                   ", ".join(plan.addresses))
        return cls(aiozc, plan)

    async def close(self) -> None:
        """Close the sockets (after goodbyes for anything still registered); idempotent."""
        if not self._closed:
            self._closed = True
            await self.aiozc.async_close()


# -- advertising -----------------------------------------------------------------------------


class Advertiser:
    """Advertises this node: registers at ``start``, re-announces on ``update``, says goodbye
    at ``stop``.

    With ``mdns`` the caller shares (and later closes) one zeroconf instance; without it the
    advertiser opens its own on the interfaces of ``host`` (what the HTTP server binds).
    """

    def __init__(self, announcement: NodeAnnouncement, port: int, *, host: str = "0.0.0.0",
                 mdns: Mdns | None = None) -> None:
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be 1-65535, got {port}")
        self._announcement = announcement
        self.port = port
        self.host = host
        self._mdns = mdns
        self._owns_mdns = mdns is None
        self._info: AsyncServiceInfo | None = None
        self._broadcasts: set[asyncio.Future[Any]] = set()
        self._lock = asyncio.Lock()

    @property
    def announcement(self) -> NodeAnnouncement:
        return self._announcement

    @property
    def active(self) -> bool:
        """Whether the service is registered on the network now."""
        return self._info is not None

    @property
    def addresses(self) -> tuple[str, ...]:
        """The addresses advertised (empty while inactive)."""
        return self._mdns.addresses if self._mdns is not None and self.active else ()

    @property
    def service_name(self) -> str:
        return f"{self._announcement.node_id}.{SERVICE_TYPE}"

    def _service_info(self, mdns: Mdns) -> AsyncServiceInfo:
        node_id = self._announcement.node_id
        return AsyncServiceInfo(SERVICE_TYPE, self.service_name, port=self.port,
                                properties=self._announcement.properties(),
                                server=f"prima-{node_id}.local.", host_ttl=TTL_S,
                                other_ttl=TTL_S, parsed_addresses=list(mdns.addresses))

    async def start(self) -> bool:
        """Register the service; False (after a warning) when it cannot be advertised.

        Takes about 1.5 s: mDNS probes for a name conflict before claiming the name.
        """
        async with self._lock:
            if self._info is not None:
                return True
            if self._mdns is None:
                self._mdns = await Mdns.open(self.host)
                if self._mdns is None:
                    return False
            info = self._service_info(self._mdns)
            try:
                broadcast = await self._mdns.aiozc.async_register_service(info)
            except NonUniqueNameException:
                _LOG.error("mDNS: another node already advertises id %s (a copied state "
                           "directory?); this node is not advertised", self._announcement.node_id)
                await self._close_own()
                return False
            except (OSError, ZeroconfError) as exc:
                _LOG.warning("mDNS: cannot advertise this node (%s); add it on the head with "
                             "--peer", exc)
                await self._close_own()
                return False
            self._track(broadcast)
            self._info = info
            _LOG.info("advertising node %s (%s) over mDNS at %s port %d",
                      self._announcement.node_id, self._announcement.role,
                      ", ".join(self._mdns.addresses), self.port)
            return True

    async def update(self, announcement: NodeAnnouncement | None = None, /,
                     **changes: Any) -> None:
        """Change what is advertised (a new role, another model): a whole announcement or some
        of its fields by name. The node id cannot change (it names the service)."""
        new = announcement if announcement is not None else self._announcement
        if changes:
            new = dataclasses.replace(new, **changes)
        if new.node_id != self._announcement.node_id:
            raise ValueError("the node id of an advertised node cannot change; stop and "
                             "start a new Advertiser")
        async with self._lock:
            self._announcement = new
            if self._info is None or self._mdns is None:
                return
            info = self._service_info(self._mdns)
            self._track(await self._mdns.aiozc.async_update_service(info))
            self._info = info

    async def stop(self) -> None:
        """Say goodbye (browsers drop the node at once) and release the sockets if they are
        this advertiser's own; idempotent."""
        async with self._lock:
            for pending in list(self._broadcasts):
                pending.cancel()
            await self._drain()
            if self._info is not None and self._mdns is not None:
                info, self._info = self._info, None
                with contextlib.suppress(Exception):
                    goodbye = await self._mdns.aiozc.async_unregister_service(info)
                    await asyncio.wait_for(goodbye, timeout=5.0)
            await self._close_own()

    def _track(self, future: Any) -> None:
        fut: asyncio.Future[Any] = asyncio.ensure_future(future)
        self._broadcasts.add(fut)
        fut.add_done_callback(self._broadcasts.discard)

    async def _drain(self) -> None:
        if self._broadcasts:
            await asyncio.gather(*self._broadcasts, return_exceptions=True)

    async def _close_own(self) -> None:
        if self._owns_mdns and self._mdns is not None:
            mdns, self._mdns = self._mdns, None
            await mdns.close()


# -- browsing --------------------------------------------------------------------------------


class Browser:
    """Keeps ``nodes`` (by node id) up to date with the ``_prima._tcp`` services on the network.

    ``on_change(change, node)`` runs on the event loop for every node added, changed or
    removed; it must not block, and an exception in it is logged, not raised. Services with
    malformed TXT are skipped with one warning each; this node's own ``own_id`` is ignored.
    """

    def __init__(self, *, own_id: str | None = None, on_change: OnChange | None = None,
                 host: str = "0.0.0.0", mdns: Mdns | None = None) -> None:
        self.own_id = own_id
        self.on_change = on_change
        self.host = host
        self._mdns = mdns
        self._owns_mdns = mdns is None
        self._browser: AsyncServiceBrowser | None = None
        self._nodes: dict[str, DiscoveredNode] = {}
        self._by_service: dict[str, str] = {}  # service name (lower case) -> node id
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._warned: set[str] = set()  # service names already reported as malformed

    @property
    def nodes(self) -> dict[str, DiscoveredNode]:
        """A snapshot of the nodes found, by node id."""
        return dict(self._nodes)

    @property
    def active(self) -> bool:
        return self._browser is not None

    async def start(self) -> bool:
        """Start browsing; False (after a warning) when multicast cannot be set up."""
        if self._browser is not None:
            return True
        if self._mdns is None:
            self._mdns = await Mdns.open(self.host)
            if self._mdns is None:
                return False
        self._browser = AsyncServiceBrowser(self._mdns.aiozc.zeroconf, SERVICE_TYPE,
                                            handlers=[self._on_state_change])
        return True

    async def stop(self) -> None:
        """Stop browsing and forget the nodes (without callbacks); idempotent."""
        if self._browser is not None:
            browser, self._browser = self._browser, None
            await browser.async_cancel()
        tasks = list(self._resolving.values())
        self._resolving.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._nodes.clear()
        self._by_service.clear()
        if self._owns_mdns and self._mdns is not None:
            mdns, self._mdns = self._mdns, None
            await mdns.close()

    # zeroconf calls this on the event loop, with keyword arguments
    def _on_state_change(self, *, zeroconf: Zeroconf, service_type: str, name: str,
                         state_change: ServiceStateChange) -> None:
        key = name.lower()
        pending = self._resolving.pop(key, None)
        if pending is not None:
            pending.cancel()
        if state_change is ServiceStateChange.Removed:
            self._warned.discard(key)
            self._drop(key)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._resolving[key] = task
        task.add_done_callback(functools.partial(self._forget_task, key))

    def _forget_task(self, key: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(key) is task:
            del self._resolving[key]
        if not task.cancelled() and task.exception() is not None:
            _LOG.error("mDNS: resolving %s failed", key, exc_info=task.exception())

    async def _resolve(self, name: str) -> None:
        if self._mdns is None:
            return
        key = name.lower()
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._mdns.aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
            _LOG.debug("mDNS: %s did not answer within %d ms", name, RESOLVE_TIMEOUT_MS)
            return
        try:
            node = self._node_from(info)
        except Exception as exc:  # whatever the network sends must not stop the browser
            if key not in self._warned:
                self._warned.add(key)
                _LOG.warning("mDNS: ignoring %s: %s", name, exc)
            self._drop(key)
            return
        self._warned.discard(key)
        if node.node_id == self.own_id:
            return
        old_id = self._by_service.get(key)
        if old_id is not None and old_id != node.node_id:
            self._drop(key)  # the service now claims another id: the old node is gone
        old = self._nodes.get(node.node_id)
        self._by_service[key] = node.node_id
        self._nodes[node.node_id] = node
        if old is None:
            self._notify("added", node)
        elif not node.same_as(old):
            self._notify("updated", node)

    @staticmethod
    def _node_from(info: AsyncServiceInfo) -> DiscoveredNode:
        fields = NodeAnnouncement.fields_from_properties(info.properties)
        addresses = tuple(info.parsed_scoped_addresses(IPVersion.V4Only)) + tuple(
            info.parsed_scoped_addresses(IPVersion.V6Only))
        if not addresses:
            raise ValueError("no address")
        if info.port is None or not 1 <= info.port <= 65535:
            raise ValueError(f"bad port {info.port!r}")
        return DiscoveredNode(**fields, addresses=_ordered(addresses), port=info.port,
                              server=info.server or "", service_name=info.name,
                              last_seen=time.time())

    def _drop(self, key: str) -> None:
        node_id = self._by_service.pop(key, None)
        if node_id is None:
            return
        node = self._nodes.pop(node_id, None)
        if node is not None:
            self._notify("removed", node)

    def _notify(self, change: Change, node: DiscoveredNode) -> None:
        _LOG.info("mDNS: node %s %s (%s, %s)", node.node_id, change, node.role, node.address)
        if self.on_change is None:
            return
        try:
            self.on_change(change, node)
        except Exception:
            _LOG.exception("mDNS: the discovery callback failed for %s", node.node_id)


def _ordered(addresses: Iterable[str]) -> tuple[str, ...]:
    """IPv4 before IPv6, each in numeric order: zeroconf hands them out most recent first."""

    def key(a: str) -> tuple[int, int]:
        ip = ipaddress.ip_address(a.split("%")[0])
        return (ip.version, int(ip))

    return tuple(sorted(dict.fromkeys(addresses), key=key))
