from __future__ import annotations

import argparse
import logging
import os

import pytest

from policies import cli
from policies.errors import ConfigError
from policies.reload import ConfigHolder, restart_needed
from tests.policies.cases import EXAMPLE

STRICTER = EXAMPLE.replace("{threshold: 0.9, action: cut", "{threshold: 0.8, action: cut")
# (bad file content, words in the logged error)
BAD = [
    (EXAMPLE + "bogus: 1\n", "config.yaml:14: bogus: unknown key"),
    (EXAMPLE.replace("policy: redteam", "policy: redteem"), "routes[0].policy: unknown policy 'redteem'"),
    ("upstreams: [\n", "invalid YAML"),
    ("", "the config is empty"),
    (EXAMPLE.replace("base_url: http://127.0.0.1:8000/v1", "base_url: ${MISSING_VAR}"),
     "environment variable MISSING_VAR is not set"),
    (b"\xff\xfe", "cannot read"),
]


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE)
    return path


def _bump_mtime(path) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_reload_swaps_a_valid_file_and_in_flight_requests_keep_theirs(config_file):
    holder = ConfigHolder.load(str(config_file), env={})
    in_flight = holder.current
    config_file.write_text(STRICTER)
    _bump_mtime(config_file)
    assert not holder.changed()  # a change counts once it has held for a poll
    assert holder.changed()
    assert holder.reload() is True
    assert holder.current.policies["redteam"].response.threshold == 0.8
    assert in_flight.policies["redteam"].response.threshold == 0.9
    assert not holder.changed()


@pytest.mark.parametrize(("content", "logged"), BAD)
def test_a_bad_file_is_rejected_logged_and_the_old_config_keeps_serving(config_file, caplog, content, logged):
    holder = ConfigHolder.load(str(config_file), env={})
    old = holder.current
    if isinstance(content, bytes):
        config_file.write_bytes(content)
    else:
        config_file.write_text(content)
    _bump_mtime(config_file)
    with caplog.at_level(logging.ERROR, logger="policies.reload"):
        assert holder.reload() is False
    assert holder.current is old
    assert logged in caplog.text and "keeping the old config" in caplog.text
    assert not holder.changed()  # the bad file is reported once, not at every poll


def test_reload_of_a_missing_file_keeps_the_old_config(config_file):
    holder = ConfigHolder.load(str(config_file), env={})
    old = holder.current
    config_file.unlink()
    assert not holder.changed()
    assert holder.reload() is False and holder.current is old


def test_touch_without_edit_is_not_a_change(config_file):
    holder = ConfigHolder.load(str(config_file), env={})
    _bump_mtime(config_file)
    assert not holder.changed()
    config_file.write_text(EXAMPLE + "\n# comment\n")
    _bump_mtime(config_file)
    assert not holder.changed() and holder.changed()


def test_a_file_still_being_written_is_not_read_half_written(config_file):
    """A file rewritten in place is read only once its stat has held for a poll: read
    between the truncation and the last write, half a config can parse (here, one cut
    before its `api_keys`: auth off until the next poll)."""
    keyed = EXAMPLE + "server:\n  api_keys: [k1]\n"
    config_file.write_text(keyed)
    holder = ConfigHolder.load(str(config_file), env={})
    with open(config_file, "w") as file:  # truncated, then written in two pieces
        file.write(STRICTER)
        file.flush()
        _bump_mtime(config_file)
        assert not holder.changed()  # the first piece: valid on its own, and not read
        file.write("server:\n  api_keys: [k2]\n")
    _bump_mtime(config_file)
    assert not holder.changed()  # it changed again since the last poll
    assert holder.changed() and holder.reload()
    assert [k.key for k in holder.current.server.api_keys] == ["k2"]


def test_initial_load_of_a_bad_file_raises(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("upstreams: {}\n")
    with pytest.raises(ConfigError, match="at least one upstream"):
        ConfigHolder.load(str(path), env={})


def test_reload_warns_about_sections_read_only_at_start(config_file, caplog):
    holder = ConfigHolder.load(str(config_file), env={})
    old = holder.current
    config_file.write_text(EXAMPLE + "server: {port: 9999}\nguard: {device: cpu}\n")
    with caplog.at_level(logging.WARNING, logger="policies.reload"):
        assert holder.reload() is True
    assert restart_needed(old, holder.current) == ("server.port", "guard")
    assert "server.port, guard" in caplog.text and "restart" in caplog.text
    assert restart_needed(old, old) == ()


def test_a_reload_that_reverts_a_start_up_setting_needs_no_restart(config_file, caplog):
    """A reload is compared with what is running, the start-up settings of the config the
    process started with: after one reload changed the port and a second put it back, the
    second warned that a restart was needed (it was compared with the first)."""
    holder = ConfigHolder.load(str(config_file), env={})
    config_file.write_text(EXAMPLE + "server: {port: 9999}\n")
    with caplog.at_level(logging.INFO, logger="policies.reload"):
        assert holder.reload() is True
    assert "server.port" in caplog.text and "restart" in caplog.text
    caplog.clear()
    config_file.write_text(EXAMPLE)
    with caplog.at_level(logging.INFO, logger="policies.reload"):
        assert holder.reload() is True
    assert "restart" not in caplog.text and "config reloaded" in caplog.text


def test_shutdown_timeout_is_named_as_needing_a_restart(config_file, caplog):
    """uvicorn takes its grace period at start-up, so a reload cannot change it: said so,
    as for the other settings read at start-up (it was reported as reloaded)."""
    holder = ConfigHolder.load(str(config_file), env={})
    config_file.write_text(EXAMPLE + "server: {shutdown_timeout: 25}\n")
    with caplog.at_level(logging.WARNING, logger="policies.reload"):
        assert holder.reload() is True
    assert "server.shutdown_timeout" in caplog.text and "restart" in caplog.text


def test_per_request_server_settings_need_no_restart(config_file, caplog):
    """Keys, body and stream limits and the request deadline are read by each request,
    so a reload that changes only them says nothing of a restart."""
    holder = ConfigHolder.load(str(config_file), env={})
    old = holder.current
    config_file.write_text(EXAMPLE + "server: {api_keys: [sk-new], max_body_bytes: 100, "
                                     "max_concurrent_streams: 2, request_timeout: 5}\n")
    with caplog.at_level(logging.INFO, logger="policies.reload"):
        assert holder.reload() is True
    assert holder.current.server.api_keys != old.server.api_keys
    assert restart_needed(old, holder.current) == ()
    assert "restart" not in caplog.text and "config reloaded" in caplog.text


def _run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="siren-proxy")
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["check-config", *argv])
    return args.func(args)


def test_check_config_prints_the_routing_table(config_file, capsys):
    assert _run_cli(str(config_file)) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "/redteam/v1" in out and "policy redteam" in out


def test_check_config_reports_the_error_and_exits_2(config_file, capsys):
    config_file.write_text(EXAMPLE.replace("holdback: 0", "holdback: -1"))
    assert _run_cli(str(config_file)) == 2
    err = capsys.readouterr().err
    assert f"{config_file}:10: policies.redteam.response.holdback: must be >= 0" in err
