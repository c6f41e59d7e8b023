"""HCCL rank tables, version 1.0 (Atlas 800T A2 / 910B): generate one, and reject a bad one before a job starts.

    {"version": "1.0", "server_count": "2",
     "server_list": [{"server_id": "10.0.0.1", "host_nic_ip": "reserve",
                      "device": [{"device_id": "0", "device_ip": "192.168.100.1", "rank_id": "0"}, ...]}, ...],
     "status": "completed"}

All values are strings. Rank ids run 0..N-1 across the servers in order. Device IPs come from each server's
``/etc/hccn.conf`` (``address_N=IP`` lines).
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path

from mindspore_llm.common import ConfigError
from mindspore_llm.config_utils import read_text
from mindspore_llm.fileio import atomic_write_text


class RankTableError(ConfigError):
    """The rank table is malformed; the message names the file and the field."""


def parse_devices(text: str) -> list[int]:
    """``0-7`` / ``0,1,2,3`` / ``0-3,6`` -> sorted device ids."""
    ids: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise RankTableError(f"--devices {text!r}: expected a list like 0-7 or 0,1,2,3")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise RankTableError(f"--devices {text!r}: range {first}-{last} runs backwards")
        ids.extend(range(first, last + 1))
    if len(set(ids)) != len(ids):
        raise RankTableError(f"--devices {text!r}: a device is listed twice")
    return sorted(ids)


def read_hccn_conf(path: str | os.PathLike) -> dict[int, str]:
    """``address_N=IP`` lines of /etc/hccn.conf -> {device id: device IP}."""
    path = Path(path)
    text = read_text(path, RankTableError)
    addresses = {int(m.group(1)): m.group(2).strip()
                 for m in re.finditer(r"^\s*address_(\d+)\s*=\s*(\S+)\s*$", text, re.MULTILINE)}
    if not addresses:
        raise RankTableError(f"{path}: no address_N=IP lines")
    return addresses


def default_device_ip(server_index: int, device_id: int) -> str:
    """A placeholder device IP for tables generated without hccn.conf (one /24 per device slot, as the usual
    Atlas setup ``hccn_tool -ip -s address 192.168.100+d.(server+1)``)."""
    return f"192.168.{100 + device_id}.{server_index + 1}"


def read_device_ips(paths: list[str | os.PathLike], servers: list[str]) -> list[dict[int, str]]:
    """One server's device IPs per entry of `servers`: from one hccn.conf per server, in the order of `servers`,
    or from a directory holding ``<server IP>.conf`` for each (copies of each server's /etc/hccn.conf)."""
    if len(paths) == 1 and Path(paths[0]).is_dir():
        directory = Path(paths[0])
        missing = [s for s in servers if not (directory / f"{s}.conf").is_file()]
        if missing:
            raise RankTableError(f"--device-ips-file {directory}: no {', '.join(f'{s}.conf' for s in missing)} "
                                 f"(the directory holds one <server IP>.conf per server, e.g. copied with "
                                 f"`scp SERVER:/etc/hccn.conf {directory}/SERVER.conf`)")
        paths = [directory / f"{s}.conf" for s in servers]
    if len(paths) != len(servers):
        raise RankTableError(f"--device-ips-file: {len(paths)} file(s) for {len(servers)} servers; give each "
                             f"server's hccn.conf, in the order of --servers, or a directory of <server IP>.conf")
    return [read_hccn_conf(path) for path in paths]


def placeholder_servers(table: dict) -> list[str]:
    """The servers whose device IPs are all `default_device_ip` placeholders (a table generated without hccn.conf)."""
    return [server["server_id"] for index, server in enumerate(table["server_list"])
            if all(d["device_ip"] == default_device_ip(index, int(d["device_id"])) for d in server["device"])]


def placeholder_warning(table: dict, source: str) -> str | None:
    servers = placeholder_servers(table)
    if not servers:
        return None
    return (f"WARNING: {source}: the device IPs of server(s) {', '.join(servers)} are the placeholders "
            f"192.168.(100+device).(server+1) that `msllm rank-table generate` writes without hccn.conf. Unless "
            f"/etc/hccn.conf on those servers holds exactly these addresses, HCCL cannot connect the devices: "
            f"regenerate the table with --device-ips-file (each server's /etc/hccn.conf, or `hccn_tool -i N -ip "
            f"-g` for device N).")


def generate(servers: list[str], devices: list[int], device_ips: list[dict[int, str]] | None = None) -> dict:
    """A table for `servers` (host IPs, in rank order) each with `devices`.

    `device_ips`: each server's device id -> IP (its hccn.conf, ``read_device_ips``), in the order of `servers`;
    without it the IPs are placeholders (``default_device_ip``) to be replaced.
    """
    if not servers:
        raise RankTableError("--servers: give at least one server IP")
    for server in servers:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise RankTableError(f"--servers: {server!r} is not an IP address") from None
    if len(set(servers)) != len(servers):
        raise RankTableError(f"--servers: a server is listed twice ({', '.join(servers)})")
    if device_ips is not None and len(device_ips) != len(servers):
        raise RankTableError(f"--device-ips-file: device IPs of {len(device_ips)} server(s) for {len(servers)} "
                             f"servers")
    server_list = []
    rank = 0
    for index, server in enumerate(servers):
        entries = []
        for device in devices:
            if device_ips is not None and device not in device_ips[index]:
                raise RankTableError(f"--device-ips-file: no address_{device} for device {device} of server {server}")
            ip = device_ips[index][device] if device_ips is not None else default_device_ip(index, device)
            entries.append({"device_id": str(device), "device_ip": ip, "rank_id": str(rank)})
            rank += 1
        server_list.append({"server_id": server, "device": entries, "host_nic_ip": "reserve"})
    table = {"version": "1.0", "server_count": str(len(servers)), "server_list": server_list, "status": "completed"}
    validate(table, "generated table")
    return table


def write(table: dict, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps(table, indent=4) + "\n")


def _string(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise RankTableError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _integer(value, where: str) -> int:
    if not isinstance(value, str) or not value.isdigit():
        raise RankTableError(f"{where}: expected a number as a string, got {value!r}")
    return int(value)


def _field(mapping, key: str, where: str):
    if not isinstance(mapping, dict):
        raise RankTableError(f"{where}: expected an object, got {type(mapping).__name__}")
    if key not in mapping:
        raise RankTableError(f"{where}: missing field {key!r}")
    return mapping[key]


def validate(table, source: str, device_num: int | None = None) -> dict:
    """Check a loaded table; return a summary {servers, devices_per_server, rank_size}. Raises RankTableError."""
    version = _string(_field(table, "version", source), f"{source}: version")
    if version != "1.0":
        raise RankTableError(f"{source}: version {version!r} is not supported (only '1.0')")
    server_count = _integer(_field(table, "server_count", source), f"{source}: server_count")
    status = _string(_field(table, "status", source), f"{source}: status")
    if status != "completed":
        raise RankTableError(f"{source}: status is {status!r}, expected 'completed'")
    server_list = _field(table, "server_list", source)
    if not isinstance(server_list, list) or not server_list:
        raise RankTableError(f"{source}: server_list must be a non-empty list")
    if len(server_list) != server_count:
        raise RankTableError(f"{source}: server_count is {server_count} but server_list has {len(server_list)} "
                             f"servers")
    ranks: list[int] = []
    device_ips: dict[str, str] = {}
    servers: list[str] = []
    counts: list[int] = []
    for i, server in enumerate(server_list):
        where = f"{source}: server_list[{i}]"
        server_id = _string(_field(server, "server_id", where), f"{where}.server_id")
        if server_id in servers:
            raise RankTableError(f"{where}.server_id: {server_id} appears twice")
        servers.append(server_id)
        devices = _field(server, "device", where)
        if not isinstance(devices, list) or not devices:
            raise RankTableError(f"{where}.device: must be a non-empty list")
        seen_ids: set[int] = set()
        for j, device in enumerate(devices):
            dwhere = f"{where}.device[{j}]"
            device_id = _integer(_field(device, "device_id", dwhere), f"{dwhere}.device_id")
            device_ip = _string(_field(device, "device_ip", dwhere), f"{dwhere}.device_ip")
            ranks.append(_integer(_field(device, "rank_id", dwhere), f"{dwhere}.rank_id"))
            if device_id in seen_ids:
                raise RankTableError(f"{dwhere}.device_id: device {device_id} appears twice on server {server_id}")
            seen_ids.add(device_id)
            if device_ip in device_ips:
                raise RankTableError(f"{dwhere}.device_ip: {device_ip} is also used by {device_ips[device_ip]}")
            device_ips[device_ip] = f"server {server_id} device {device_id}"
        counts.append(len(devices))
    if len(set(counts)) > 1:
        raise RankTableError(f"{source}: servers have unequal device counts {counts}; every server must run the "
                             f"same number of devices")
    duplicates = sorted({r for r in ranks if ranks.count(r) > 1})
    if duplicates:
        raise RankTableError(f"{source}: rank_id {', '.join(map(str, duplicates))} appears more than once")
    if ranks != list(range(len(ranks))):
        raise RankTableError(f"{source}: rank_id must run 0..{len(ranks) - 1} in server and device order, got "
                             f"{ranks}")
    if device_num is not None and device_num != len(ranks):
        raise RankTableError(f"{source}: the table has {len(ranks)} devices ({server_count} servers x {counts[0]}), "
                             f"the config needs {device_num}")
    return {"servers": servers, "devices_per_server": counts[0], "rank_size": len(ranks)}


def load(path: str | os.PathLike, device_num: int | None = None) -> tuple[dict, dict]:
    """(table, summary) of a rank table file; RankTableError names the file and the problem."""
    path = Path(path)
    text = read_text(path, RankTableError)
    try:
        table = json.loads(text)
    except json.JSONDecodeError as err:
        raise RankTableError(f"{path}: invalid JSON ({err})") from None
    return table, validate(table, str(path), device_num)


def find_server(table: dict, source: str, server_index: int | None = None, local_ips: list[str] = ()) -> int:
    """This host's position in the table: `server_index` if given, else the server whose server_id is one of
    `local_ips` (a host's addresses, e.g. ``hostname -I``)."""
    servers = [server["server_id"] for server in table["server_list"]]
    if server_index is not None:
        if not 0 <= server_index < len(servers):
            raise RankTableError(f"{source}: server index {server_index} is out of range: the table has "
                                 f"{len(servers)} servers ({', '.join(servers)})")
        return server_index
    matches = [i for i, server in enumerate(servers) if server in set(local_ips)]
    if len(matches) != 1:
        raise RankTableError(f"{source}: none of this host's addresses ({' '.join(local_ips) or 'none'}) is a "
                             f"server_id of the table ({', '.join(servers)}); set SERVER_ID or --server-index"
                             if not matches else f"{source}: this host matches several servers {matches}")
    return matches[0]


def local_ranks(table: dict, server_index: int) -> list[tuple[int, int]]:
    """(rank_id, device_id) of every device of one server."""
    return [(int(d["rank_id"]), int(d["device_id"])) for d in table["server_list"][server_index]["device"]]
