"""Facts about a host's network: its address, interfaces and default routes.

On Linux the kernel is asked directly over a netlink socket (what ``ip addr``
and ``ip route`` do), so no command output is parsed.  Runs on the host:
standard library only, Python 3.6+ (socket imported where used: 2 ms a host
that only wants the package manager).
"""
import os
import struct

from chopsticks_facts._util import LINUX, MACOS, read_text, unsupported

# linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h
_NETLINK_ROUTE = 0
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_RTM_NEWROUTE, _RTM_GETROUTE = 24, 26
_IFA_ADDRESS, _IFA_LOCAL, _IFA_FLAGS = 1, 2, 8
_IFA_F_SECONDARY = 0x01
_RTA_DST, _RTA_OIF, _RTA_GATEWAY, _RTA_PRIORITY, _RTA_PREFSRC, _RTA_TABLE = 1, 4, 5, 6, 7, 15
_RT_TABLE_MAIN, _RTN_UNICAST = 254, 1

_NLMSGHDR = struct.Struct("=IHHII")    # length, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")   # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")   # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTATTR = struct.Struct("=HH")         # length, type


def _align(n):
    return (n + 3) & ~3


def _netlink_dump(msg_type, payload):
    """Every message of a netlink dump request, as (type, body) pairs."""
    import socket

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), msg_type,
                                _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
        sock.send(header + payload)
        messages = []
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
                if kind == _NLMSG_DONE:
                    return messages
                if kind == _NLMSG_ERROR:
                    errno = -struct.unpack_from("=i", data, offset + _NLMSGHDR.size)[0]
                    if errno:
                        raise OSError(errno, "netlink: " + os.strerror(errno))
                    return messages
                messages.append((kind, data[offset + _NLMSGHDR.size:offset + length]))
                offset += _align(length)
    finally:
        sock.close()


def _attributes(body, start):
    attrs = {}
    offset = start
    while offset + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, offset)
        if length < _RTATTR.size:
            break
        attrs[kind] = body[offset + _RTATTR.size:offset + length]
        offset += _align(length)
    return attrs


def _addresses():
    """{interface index: [(family, address, prefixlen, secondary)]} in kernel order."""
    import socket

    found = {}
    for kind, body in _netlink_dump(_RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        if kind != _RTM_NEWADDR:
            continue
        family, prefixlen, flags, _, index = _IFADDRMSG.unpack_from(body)
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        attrs = _attributes(body, _IFADDRMSG.size)
        if _IFA_FLAGS in attrs:
            flags = struct.unpack("=I", attrs[_IFA_FLAGS])[0]
        raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
        if raw:
            found.setdefault(index, []).append(
                (family, socket.inet_ntop(family, raw), prefixlen, bool(flags & _IFA_F_SECONDARY)))
    return found


def _default_routes(family):
    """Default routes of the main table, best (lowest metric) first."""
    import socket

    routes = []
    for kind, body in _netlink_dump(_RTM_GETROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
        if kind != _RTM_NEWROUTE:
            continue
        rt_family, dst_len, _, _, table, _, _, rt_type, _ = _RTMSG.unpack_from(body)
        attrs = _attributes(body, _RTMSG.size)
        if _RTA_TABLE in attrs:
            table = struct.unpack("=I", attrs[_RTA_TABLE])[0]
        if rt_family != family or dst_len != 0 or table != _RT_TABLE_MAIN or rt_type != _RTN_UNICAST:
            continue
        oif = struct.unpack("=I", attrs[_RTA_OIF])[0] if _RTA_OIF in attrs else None
        routes.append({
            "metric": struct.unpack("=I", attrs[_RTA_PRIORITY])[0] if _RTA_PRIORITY in attrs else 0,
            "gateway": socket.inet_ntop(family, attrs[_RTA_GATEWAY]) if _RTA_GATEWAY in attrs else None,
            "source": socket.inet_ntop(family, attrs[_RTA_PREFSRC]) if _RTA_PREFSRC in attrs else None,
            "index": oif,
        })
    routes.sort(key=lambda r: r["metric"])
    return routes


def _index_names():
    import socket

    return dict(socket.if_nameindex())


def _route_summary(route, family, addresses, names):
    address = route["source"]
    if address is None:
        candidates = [a for f, a, _, secondary in addresses.get(route["index"], [])
                      if f == family and not secondary and not a.startswith("fe80:")]
        address = candidates[0] if candidates else None
    return {"interface": names.get(route["index"]), "gateway": route["gateway"],
            "address": address, "metric": route["metric"]}


def default_route():
    """The default routes: ``{'ipv4': {'interface', 'gateway', 'address', 'metric'} or None,
    'ipv6': ... or None}``; ``address`` is the source address the host uses on it."""
    import socket

    if not LINUX:
        raise unsupported("default_route")
    addresses, names = _addresses(), _index_names()
    result = {}
    for key, family in (("ipv4", socket.AF_INET), ("ipv6", socket.AF_INET6)):
        routes = _default_routes(family)
        result[key] = _route_summary(routes[0], family, addresses, names) if routes else None
    return result


def ip():
    """The host's IPv4 address on its default route, as a string; ``None`` without one.

    This is the address other hosts most likely reach it by (Ansible's
    ``default_ipv4.address``).  On macOS it is found by asking the kernel
    which source address a UDP socket would use (no packet is sent).
    """
    import socket

    if LINUX:
        routes = _default_routes(socket.AF_INET)
        if not routes:
            return None
        return _route_summary(routes[0], socket.AF_INET, _addresses(), _index_names())["address"]
    if MACOS:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1; connect() on UDP sends nothing
            return sock.getsockname()[0]
        except OSError:
            return None
        finally:
            sock.close()
    raise unsupported("ip")


def interfaces():
    """The network interfaces, by name.

    ``{'eth0': {'index': 2, 'mac': '52:54:00:12:34:56' or None, 'mtu': 1500,
    'state': 'up' | 'down' | 'unknown' | ..., 'ipv4': [{'address',
    'prefixlen'}], 'ipv6': [...]}}``, addresses in the kernel's order
    (primary first).
    """
    import socket

    if not LINUX:
        raise unsupported("interfaces")
    addresses = _addresses()
    result = {}
    for index, name in sorted(_index_names().items()):
        sys_dir = "/sys/class/net/%s/" % name
        mtu = read_text(sys_dir + "mtu")
        mac = read_text(sys_dir + "address")
        entry = {"index": index, "mac": mac if mac and mac != "00:00:00:00:00:00" else None,
                 "mtu": int(mtu) if mtu and mtu.isdigit() else None,
                 "state": read_text(sys_dir + "operstate", "unknown"), "ipv4": [], "ipv6": []}
        for family, address, prefixlen, _ in addresses.get(index, []):
            key = "ipv4" if family == socket.AF_INET else "ipv6"
            entry[key].append({"address": address, "prefixlen": prefixlen})
        result[name] = entry
    return result
