"""The fleet's node commands before Ray runs anything: the token's checks, the refusals that need no cluster,
and the `ray start` arguments a fleet uses."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from lmpack.errors import ConfigError, NotFoundError
from lmpack.fleet.node import NodeSizes, start_args
from lmpack.fleet.token import TOKEN_ENV, check_token_file, create_token


def test_a_new_token_is_private_random_and_never_overwritten(tmp_path):
    path = create_token(tmp_path / "etc" / "fleet.token")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert len(token) == 64 and int(token, 16)
    assert create_token(tmp_path / "other.token").read_text() != path.read_text()
    with pytest.raises(ConfigError, match="never overwritten"):
        create_token(path)
    assert path.read_text().strip() == token


def test_a_token_readable_by_others_short_or_missing_is_refused(tmp_path, monkeypatch):
    path = create_token(tmp_path / "fleet.token")
    assert check_token_file(path) == path
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by other users") as refused:
        check_token_file(path)
    assert refused.value.hint == f"chmod 600 {path}"
    short = tmp_path / "short.token"
    short.write_text("abc\n")
    os.chmod(short, 0o600)
    with pytest.raises(ConfigError, match="at least 32 characters"):
        check_token_file(short)
    with pytest.raises(NotFoundError, match="does not exist"):
        check_token_file(tmp_path / "none.token")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match="needs a token file"):
        check_token_file(None)
    os.chmod(path, 0o600)
    monkeypatch.setenv(TOKEN_ENV, str(path))
    assert check_token_file(None) == path


def test_a_head_on_a_taken_port_is_refused_before_ray_starts(lmpack_cli, tmp_path):
    token = create_token(tmp_path / "fleet.token")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = lmpack_cli("fleet", "head", "--address", "127.0.0.1", "--port", port, "--token-file", token)
    assert result.exit_code == 24, result.output
    assert f"cannot use 127.0.0.1:{port}" in result.stderr


def test_a_port_that_a_crashed_head_left_with_closed_connections_is_free_again():
    """The head's side closed its connections first (as a killed GCS's do), which leaves them in TIME_WAIT on its
    port for a minute: a head started again at once must not be refused for them."""
    from lmpack.fleet.node import check_port_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's servers (Ray's GCS) do
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server's side closes first: its end goes to TIME_WAIT
        client.recv(1)
        client.close()
    with pytest.raises(OSError):  # what a plain bind says, the refusal this test is about
        with socket.socket() as plain:
            plain.bind(("127.0.0.1", port))
    check_port_free("127.0.0.1", port)


def test_joining_an_unreachable_head_is_named_at_once(lmpack_cli, tmp_path):
    token = create_token(tmp_path / "fleet.token")
    with socket.socket() as closed:  # a port that nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = lmpack_cli("fleet", "join", f"127.0.0.1:{port}", "--address", "127.0.0.1", "--token-file", token)
    assert result.exit_code == 24, result.output
    assert f"cannot reach the head at 127.0.0.1:{port}" in result.stderr


def test_a_fleet_node_starts_with_the_given_address_no_dashboard_no_usage_reports_and_the_hosts_sizes():
    sizes = NodeSizes.of_host()
    head = start_args(address="10.0.0.1", sizes=sizes, head_port=6379)
    assert "--head" in head and "--port=6379" in head and "--node-ip-address=10.0.0.1" in head
    assert "--include-dashboard=false" in head and "--disable-usage-stats" in head
    assert f"--memory={sizes.memory_bytes}" in head and f"--object-store-memory={sizes.object_store_bytes}" in head
    assert any(arg.startswith("--labels=lmpack-version=") for arg in head)
    with_dashboard = start_args(address="10.0.0.1", sizes=sizes, head_port=6379, dashboard=True)
    assert "--dashboard-host=10.0.0.1" in with_dashboard  # never all interfaces
    node = start_args(address="10.0.0.2", sizes=sizes, join="10.0.0.1:6379")
    assert "--address=10.0.0.1:6379" in node and "--head" not in node


def test_a_nodes_declared_memory_leaves_room_for_the_object_store_and_the_system():
    import psutil

    total = psutil.virtual_memory().total
    sizes = NodeSizes.of_host()
    assert sizes.memory_bytes + sizes.object_store_bytes < total
    assert sizes.cpus == len(os.sched_getaffinity(0))
    assert NodeSizes.of_host(cpus=1, memory_bytes=2**30).memory_bytes == 2**30


def test_the_head_a_host_joined_is_noted_for_later_commands_there(tmp_path):
    from lmpack.config.paths import config_home
    from lmpack.fleet.cluster import local_address_towards, remember_head, remembered_head

    assert remembered_head() is None
    remember_head("10.0.0.1:6379")
    assert remembered_head() == "10.0.0.1:6379"
    (config_home() / "fleet-head.json").write_text("not json")
    assert remembered_head() is None  # a damaged note is no address, never a crash
    assert local_address_towards("127.0.0.1", 6379) == "127.0.0.1"
