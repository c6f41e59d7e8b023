"""Rank tables (HCCL v1.0): generation and every rejection `msllm rank-table validate` promises."""
import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mindspore_llm.cli import main
from mindspore_llm.parallel import rank_table as rt

ROOT = Path(__file__).resolve().parents[1]


def table_16p():
    return rt.generate(["10.0.0.1", "10.0.0.2"], list(range(8)))


def test_generated_table_layout():
    table = table_16p()
    assert table["version"] == "1.0" and table["server_count"] == "2" and table["status"] == "completed"
    ranks = [(s["server_id"], d["device_id"], d["rank_id"]) for s in table["server_list"] for d in s["device"]]
    assert ranks == [(server, str(device), str(8 * i + device))
                     for i, server in enumerate(["10.0.0.1", "10.0.0.2"]) for device in range(8)]
    assert all(isinstance(v, str) for s in table["server_list"] for d in s["device"] for v in d.values())
    assert rt.validate(table, "t", device_num=16)["rank_size"] == 16


def test_shipped_tables_are_valid():
    _, summary16 = rt.load(ROOT / "rank_tables/rank_table_16p.json", device_num=16)
    _, summary8 = rt.load(ROOT / "rank_tables/rank_table_8p.json", device_num=8)
    assert (len(summary16["servers"]), summary16["devices_per_server"]) == (2, 8)
    assert (len(summary8["servers"]), summary8["devices_per_server"]) == (1, 8)


def test_hccn_conf_device_ips(tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text("".join(f"address_{d}=29.0.{d}.7\nnetmask_{d}=255.255.255.0\n" for d in range(8)))
    table = rt.generate(["10.0.0.9"], rt.parse_devices("0-3,6"), [rt.read_hccn_conf(conf)])
    assert [(d["device_id"], d["device_ip"]) for d in table["server_list"][0]["device"]] == [
        ("0", "29.0.0.7"), ("1", "29.0.1.7"), ("2", "29.0.2.7"), ("3", "29.0.3.7"), ("6", "29.0.6.7")]
    assert rt.placeholder_warning(table, "t") is None


def _hccn(path, server: int):
    path.write_text("".join(f"address_{d}=29.{server}.{d}.7\nnetmask_{d}=255.255.255.0\n" for d in range(8)))
    return path


@pytest.mark.parametrize("form", ["one file per server", "a directory"])
def test_several_servers_take_each_servers_hccn_conf(tmp_path, form):
    servers = ["10.0.0.1", "10.0.0.2"]
    if form == "a directory":
        (tmp_path / "hccn").mkdir()
        for i, server in enumerate(servers):
            _hccn(tmp_path / "hccn" / f"{server}.conf", i)
        args = ["--device-ips-file", str(tmp_path / "hccn")]
    else:
        args = [arg for i in range(2) for arg in ("--device-ips-file", str(_hccn(tmp_path / f"hccn{i}.conf", i)))]
    out = tmp_path / "table.json"
    result = CliRunner().invoke(main, ["rank-table", "generate", "--servers", ",".join(servers), "--devices", "0-7",
                                       *args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    table = json.loads(out.read_text())
    assert [[d["device_ip"] for d in s["device"]] for s in table["server_list"]] == [
        [f"29.{i}.{d}.7" for d in range(8)] for i in range(2)]
    assert "WARNING" not in result.output


def test_hccn_files_must_match_the_servers(tmp_path):
    one = _hccn(tmp_path / "a.conf", 0)
    result = CliRunner().invoke(main, ["rank-table", "generate", "--servers", "10.0.0.1,10.0.0.2",
                                       "--device-ips-file", str(one)])
    assert result.exit_code == 2 and "1 file(s) for 2 servers" in result.output
    (tmp_path / "dir").mkdir()
    _hccn(tmp_path / "dir" / "10.0.0.1.conf", 0)
    result = CliRunner().invoke(main, ["rank-table", "generate", "--servers", "10.0.0.1,10.0.0.2",
                                       "--device-ips-file", str(tmp_path / "dir")])
    assert result.exit_code == 2 and "no 10.0.0.2.conf" in result.output


def test_placeholder_device_ips_are_warned_about_loudly(tmp_path):
    generated = CliRunner().invoke(main, ["rank-table", "generate", "--servers",
                                                          "10.0.0.1,10.0.0.2", "--output", str(tmp_path / "t.json")])
    assert generated.exit_code == 0 and "WARNING" in generated.stderr and "--device-ips-file" in generated.stderr
    validated = CliRunner().invoke(main, ["rank-table", "validate",
                                                          str(ROOT / "rank_tables/rank_table_16p.json")])
    assert validated.exit_code == 0, validated.output
    assert "WARNING" in validated.stderr and "10.0.0.1, 10.0.0.2" in validated.stderr
    assert "placeholders 192.168.(100+device).(server+1)" in validated.stderr


def _mutate(fn):
    table = copy.deepcopy(table_16p())
    fn(table)
    return table


def _set(path, value):
    def fn(table):
        node = table
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return fn


def _delete(path):
    def fn(table):
        node = table
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return fn


MALFORMED = {
    "missing server_list": (_delete(["server_list"]), "missing field 'server_list'"),
    "missing device_ip": (_delete(["server_list", 0, "device", 3, "device_ip"]), "missing field 'device_ip'"),
    "missing rank_id": (_delete(["server_list", 1, "device", 0, "rank_id"]), "missing field 'rank_id'"),
    "server_count mismatch": (_set(["server_count"], "3"), "server_count is 3 but server_list has 2"),
    "duplicate rank id": (_set(["server_list", 1, "device", 1, "rank_id"], "8"), "rank_id 8 appears more than once"),
    "non-contiguous rank ids": (_set(["server_list", 1, "device", 7, "rank_id"], "16"), "must run 0..15"),
    "duplicate device id": (_set(["server_list", 0, "device", 5, "device_id"], "4"), "device 4 appears twice"),
    "duplicate device ip": (_set(["server_list", 1, "device", 2, "device_ip"], "192.168.100.1"),
                            "192.168.100.1 is also used by server 10.0.0.1 device 0"),
    "unequal device counts": (lambda t: t["server_list"][1]["device"].pop(), "unequal device counts [8, 7]"),
    "number not a string": (_set(["server_list", 0, "device", 0, "device_id"], 0), "expected a number as a string"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_table_is_rejected(case):
    mutate, message = MALFORMED[case]
    with pytest.raises(rt.RankTableError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace(".", r"\.")):
        rt.validate(_mutate(mutate), "table.json")


def test_device_count_disagreeing_with_config(tmp_path):
    path = tmp_path / "t.json"
    rt.write(table_16p(), path)
    with pytest.raises(rt.RankTableError, match="the table has 16 devices .* the config needs 8"):
        rt.load(path, device_num=8)
    result = CliRunner().invoke(main, ["rank-table", "validate", str(path), "--config",
                                       str(ROOT / "configs/qwen2_5_32b_sft_8k_16p.yaml")])
    assert result.exit_code == 0 and "16 ranks" in result.output
    result = CliRunner().invoke(main, ["rank-table", "validate", str(ROOT / "rank_tables/rank_table_8p.json"),
                                       "--config", str(ROOT / "configs/qwen2_5_32b_sft_8k_16p.yaml")])
    assert result.exit_code == 2 and "the config needs 16" in result.output


def test_invalid_json_is_rejected(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"version": "1.0", "server_count": ')
    result = CliRunner().invoke(main, ["rank-table", "validate", str(path)])
    assert result.exit_code == 2 and "invalid JSON" in result.output


def test_generate_cli_writes_a_valid_table(tmp_path):
    out = tmp_path / "rank_table_16p.json"
    result = CliRunner().invoke(main, ["rank-table", "generate", "--servers", "10.0.0.1,10.0.0.2", "--devices",
                                       "0-7", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == table_16p()
    bad = CliRunner().invoke(main, ["rank-table", "generate", "--servers", "10.0.0.1,not-an-ip"])
    assert bad.exit_code == 2 and "not an IP address" in bad.output


def test_find_server_by_address_or_index():
    table = table_16p()
    assert rt.find_server(table, "t", local_ips=["127.0.0.1", "10.0.0.2"]) == 1
    assert rt.find_server(table, "t", server_index=0) == 0
    assert rt.local_ranks(table, 1) == [(8 + d, d) for d in range(8)]
    with pytest.raises(rt.RankTableError, match="set SERVER_ID or --server-index"):
        rt.find_server(table, "t", local_ips=["192.0.2.1"])
    with pytest.raises(rt.RankTableError, match="out of range"):
        rt.find_server(table, "t", server_index=2)
