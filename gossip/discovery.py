"""Finding peers and being found: addresses (parsing them, choosing the one to advertise)
and mDNS discovery on the LAN (python-zeroconf), run on the transport's asyncio loop.

Each node registers one service of type `_autoresearch._tcp.local.`, bound to the interface
of its advertised address, with its node id, port and protocol version in the TXT properties,
and browses for the others. Every peer found is handed to the transport as "host:port",
which joins through it as it would through a `--seed`: discovery only introduces, and the
signed membership protocol decides what to believe. Nothing here is trusted.

Where multicast cannot work (zeroconf fails to start, no LAN address) the node says so once,
through `on_warning`, and carries on with its seeds.
"""

import asyncio
import re
import socket

DEFAULT_PORT = 7645      # the port a node listens on unless told otherwise
SERVICE_TYPE = "_autoresearch._tcp.local."
MDNS_GROUP = "224.0.0.251"
RESOLVE_TIMEOUT_MS = 3000
CLOSE_TIMEOUT_S = 3.0
IFF_UP, IFF_MULTICAST = 0x1, 0x1000
WILDCARD = ("0.0.0.0", "::", "*", "")
_HOST = re.compile(r"[A-Za-z0-9._%:-]{1,255}")


def split_address(address, default_port=None):
    """'host:port' or '[v6]:port' -> (host, port); ValueError if it is not one."""
    if not isinstance(address, str):
        raise ValueError("address is not a string")
    host, sep, port = address.rpartition(":")
    if not sep or ":" in host and not host.startswith("["):
        if default_port is None:
            raise ValueError(f"{address!r} is not host:port")
        host, port = address, str(default_port)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r}: bad port")
    if host not in ("*", "") and not _HOST.fullmatch(host):
        raise ValueError(f"{address!r}: bad host")
    return host, int(port)


def join_address(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _route_source(host, port=9):
    """The local address the kernel would use to reach host (a UDP connect sends nothing)."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            ip = s.getsockname()[0]
    except (OSError, IndexError, UnicodeError):
        return None
    return None if ip in ("0.0.0.0", "::") else ip


def _interface_flags(name):
    """The interface's IFF_* flags (Linux), or None where they cannot be read."""
    try:
        with open(f"/sys/class/net/{name}/flags") as f:
            return int(f.read(), 16)
    except (OSError, ValueError):
        return None


def _interface_up(name):
    flags = _interface_flags(name)
    return flags is None or bool(flags & IFF_UP)  # unknown: trust the address list


def _first_lan_ipv4():
    try:
        import ifaddr  # a dependency of zeroconf
        adapters = ifaddr.get_adapters()
    except Exception:  # noqa: BLE001 (absent or unreadable: fall through to loopback)
        return None
    for adapter in adapters:
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith(("127.", "169.254.")) and _interface_up(adapter.name):
                return ip.ip
    return None


def advertised_host(listen_host, seeds=()):
    """The host part of the address peers should reply to: the listen host if it names one,
    else the local address the kernel would use to reach the first seed, else the one it
    would use for the default route, else the first non-loopback IPv4 address of an
    interface that is up, else 127.0.0.1."""
    if listen_host not in WILDCARD:
        return listen_host
    for seed in list(seeds)[:1]:
        try:
            ip = _route_source(*split_address(seed, DEFAULT_PORT))
        except ValueError:
            ip = None
        if ip:
            return ip
    return _route_source("192.0.2.1") or _first_lan_ipv4() or "127.0.0.1"  # TEST-NET-1: the default route


def _multicast_problem(host):
    """Why multicast from `host` cannot work here, or None. zeroconf itself starts without
    complaint on an interface that cannot send multicast, and then finds nothing."""
    if ":" in host:
        return None
    try:
        import ifaddr
        names = [a.name for a in ifaddr.get_adapters() if any(ip.ip == host for ip in a.ips)]
    except Exception:  # noqa: BLE001 (cannot tell: let zeroconf try)
        names = []
    for name in names[:1]:
        flags = _interface_flags(name)
        if flags is not None and not flags & IFF_MULTICAST:
            return f"interface {name} has multicast turned off"
    try:  # a connect is a route lookup; nothing is sent
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(host))
            s.connect((MDNS_GROUP, 5353))
    except OSError as e:
        return f"no route to the mDNS group {MDNS_GROUP} ({e.strerror or e})"
    return None


class Mdns:
    def __init__(self, node_id, host, port, on_found, on_warning, version=1):
        self.node_id, self.host, self.port, self.version = node_id, host, port, version
        self.on_found, self.on_warning = on_found, on_warning   # (address, peer id); (text)
        self.zc = self.browser = None
        self.tasks = set()                                      # resolutions under way, owned

    async def start(self):
        """Register and browse; False (after one warning) where mDNS cannot run here."""
        if self.host.startswith("127.") or self.host in ("::1", "localhost"):
            self.on_warning(f"mDNS off: the advertised address {self.host} is loopback; using seeds only")
            return False
        problem = _multicast_problem(self.host)
        if problem:
            self.on_warning(f"mDNS unavailable on {self.host}: {problem}; using seeds only")
            return False
        try:
            from zeroconf import IPVersion
            from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
            v6 = ":" in self.host
            self.zc = AsyncZeroconf(interfaces=[self.host], ip_version=IPVersion.V6Only if v6 else IPVersion.V4Only)
            self.browser = AsyncServiceBrowser(self.zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change])
            info = AsyncServiceInfo(
                SERVICE_TYPE, f"{self.node_id}.{SERVICE_TYPE}", port=self.port,
                parsed_addresses=[self.host], server=f"autoresearch-{self.node_id}.local.",
                properties={"id": self.node_id, "port": str(self.port), "v": str(self.version)})
            announced = await self.zc.async_register_service(info, allow_name_change=True)
            await announced
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 (zeroconf raises many types when multicast is absent)
            self.on_warning(f"mDNS unavailable on {self.host} ({type(e).__name__}: {e}); using seeds only")
            await self.close()
            return False
        return True

    def _on_change(self, zeroconf, service_type, name, state_change):
        from zeroconf import ServiceStateChange
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated) and len(self.tasks) < 64:
            task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _resolve(self, service_type, name):
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceInfo
        info = AsyncServiceInfo(service_type, name)
        try:
            if not await info.async_request(self.zc.zeroconf, RESOLVE_TIMEOUT_MS):
                return
        except Exception:  # noqa: BLE001 (a peer's broken answer is not our failure)
            return
        peer = (info.properties or {}).get(b"id") or b""
        peer = peer.decode("ascii", "replace") if isinstance(peer, bytes) else ""
        if peer == self.node_id or not info.port:
            return
        hosts = info.parsed_addresses(IPVersion.V4Only) or info.parsed_addresses()
        for host in hosts:
            try:
                socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
            except OSError:
                continue
            self.on_found(join_address(host, info.port), peer)
            return

    async def close(self):
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=CLOSE_TIMEOUT_S)
        zc, browser, self.zc, self.browser = self.zc, self.browser, None, None
        try:
            if browser is not None:
                await asyncio.wait_for(browser.async_cancel(), CLOSE_TIMEOUT_S)
            if zc is not None:
                await asyncio.wait_for(zc.async_unregister_all_services(), CLOSE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 (closing anyway)
            pass
        finally:
            if zc is not None:
                try:
                    await asyncio.wait_for(zc.async_close(), CLOSE_TIMEOUT_S)
                except Exception:  # noqa: BLE001
                    pass
