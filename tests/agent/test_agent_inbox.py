"""Updates from an inbox: real signed bundles of the tiny Llama dropped into a real directory.

The inbox's own decisions (complete files, verification, rejections, policy, window) are driven round by round
with a controlled clock; the whole path (a real agent under client load, a switch with no failed request, a
crash-looping update rolled back with an alert, a bundle copied slowly in chunks) with real processes.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import tarfile
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from agent_helpers import WebhookReceiver, free_port, run_agent, wait_for, write_config
from test_agent_switch import NAME, Load

from lmpack.agent.config import ServerSpec, UpdateSettings, load_agent_config
from lmpack.agent.inbox import Inbox
from lmpack.bundle import signing
from lmpack.bundle.install import InstallOptions, install, is_installed, set_current
from lmpack.bundle.pack import pack, sign_bundle
from lmpack.bundle.releases import current_version
from lmpack.errors import ConfigError


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    private, public, _ = signing.keygen(root / "release")
    stranger, _, _ = signing.keygen(root / "stranger")
    return {"private": private, "public": public, "stranger": stranger}


@pytest.fixture(scope="module")
def bundles(llama_variant, keys, tmp_path_factory) -> dict[str, Path]:
    """Signed bundles of the tiny Llama as versions 1.0.0, 1.1.0 and 1.2.0, one of another release, one unsigned and
    one signed by a stranger's key."""
    root = tmp_path_factory.mktemp("bundles")
    made = {}
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        made[version] = pack([llama_variant], root / f"{NAME}-{version}.lmpack", name=NAME, version=version).path
        sign_bundle(made[version], keys["private"])
    made["other"] = pack([llama_variant], root / "other-2.0.0.lmpack", name="other", version="2.0.0").path
    sign_bundle(made["other"], keys["private"])
    made["unsigned"] = pack(
        [llama_variant], root / "unsigned" / f"{NAME}-1.3.0.lmpack", name=NAME, version="1.3.0"
    ).path
    made["stranger"] = pack(
        [llama_variant], root / "stranger" / f"{NAME}-1.3.0.lmpack", name=NAME, version="1.3.0"
    ).path
    sign_bundle(made["stranger"], keys["stranger"])  # signed, by a key this host does not trust
    return made


def make_prefix(tmp: Path, bundles: dict[str, Path], keys: dict[str, Path]) -> Path:
    """1.0.0 installed and current, as `lmpack install` leaves it."""
    prefix = tmp / "prefix"
    install(bundles["1.0.0"], prefix, InstallOptions(public_keys=(keys["public"],)))
    return prefix


class Rounds:
    """An Inbox driven by hand: a clock the test moves, a switch that answers at once, the events it sent."""

    def __init__(self, tmp: Path, prefix: Path, keys: dict[str, Path], **settings):
        self.now, self.minutes, self.events, self.switches = 0.0, 3 * 60, [], []
        self.serving = {"version": "1.0.0", "rolled_back": []}
        self.inbox_dir = tmp / "inbox"
        self.inbox_dir.mkdir(parents=True, exist_ok=True)
        server = ServerSpec(None, prefix, NAME, "127.0.0.1", 8000, (), 5)
        options = {"settle_seconds": 1.0, **settings}
        self.inbox = Inbox(
            UpdateSettings(inbox=self.inbox_dir, public_key=keys["public"], **options),
            server,
            request_switch=self._switch,
            serving=lambda: self.serving,
            publish=self.events.append,
            switch_timeout=5,
            clock=lambda: self.now,
            local_minutes=lambda: self.minutes,
        )

    def _switch(self, name: str, version: str) -> Future:
        self.switches.append(version)
        self.serving = {**self.serving, "version": version}
        done: Future = Future()
        done.set_result({"action": "switched", "previous": "1.0.0", "version": version})
        return done

    def drop(self, bundle: Path, name: str | None = None) -> Path:
        target = self.inbox_dir / (name or bundle.name)
        shutil.copyfile(bundle, target)
        return target

    def settle(self) -> list[str]:
        """Two rounds a settle period apart: what a complete file needs; the steps announced meanwhile."""
        start = len(self.events)
        self.inbox.poll()
        self.now += 1.5
        self.inbox.poll()
        return [event["alert"] for event in self.events[start:]]

    def reason(self, where: str, name: str) -> str:
        return (self.inbox_dir / where / f"{name}.reason.txt").read_text()


def test_a_good_update_is_verified_installed_switched_and_filed(bundles, keys, tmp_path):
    prefix = make_prefix(tmp_path, bundles, keys)
    rounds = Rounds(tmp_path, prefix, keys)
    rounds.drop(bundles["1.1.0"])
    assert rounds.settle() == ["update-received", "update-installed", "update-switching", "update-switched"]
    assert rounds.switches == ["1.1.0"] and is_installed(prefix, NAME, "1.1.0")
    # installed beside, `current` left to the switch (which moves it once the new version serves)
    assert current_version(prefix / "releases" / NAME) == "1.0.0"
    assert not list(rounds.inbox_dir.glob("*.lmpack")) and "installed: tiny 1.1.0" in rounds.reason(
        "done", bundles["1.1.0"].name
    )
    # the same bundle twice is a no-op: already installed, already serving
    rounds.drop(bundles["1.1.0"])
    assert rounds.settle() == ["update-received", "update-installed"] and rounds.switches == ["1.1.0"]
    assert rounds.events[-1]["action"] == "unchanged" and len(list((rounds.inbox_dir / "done").glob("*.lmpack"))) == 2


def test_a_copy_in_progress_is_not_taken(bundles, keys, tmp_path):
    """Under a temporary name, or still growing in place: left alone until complete and settled."""
    rounds = Rounds(tmp_path, make_prefix(tmp_path, bundles, keys), keys)
    data = bundles["1.1.0"].read_bytes()
    temporary = rounds.inbox_dir / f".{bundles['1.1.0'].name}.part"
    temporary.write_bytes(data)
    assert rounds.settle() == []
    growing = rounds.inbox_dir / bundles["1.1.0"].name
    for start in range(0, len(data), len(data) // 4 + 1):  # a chunk per round, each round sooner than the settle
        with open(growing, "ab") as handle:
            handle.write(data[start : start + len(data) // 4 + 1])
        rounds.inbox.poll()
        rounds.now += 0.6
        assert rounds.events == [] and rounds.inbox.status()["pending"] == [growing.name]
    assert rounds.settle()[:2] == ["update-received", "update-installed"]


@pytest.mark.parametrize(
    "how, fragment",
    [
        ("unsigned", "requires signed bundles"),
        ("stranger", "made with another key"),
        ("tampered", "sha256 differs from the manifest (altered)"),
        ("truncated", "is not a complete bundle archive"),
        ("other", "holds release 'other'; this host takes 'tiny'"),
        ("older", "older than the current 1.1.0"),
    ],
)
def test_a_bad_bundle_is_rejected_with_its_reason_and_the_next_good_one_is_taken(
    bundles, keys, tmp_path, how, fragment
):
    prefix = make_prefix(tmp_path, bundles, keys)
    if how == "older":
        install(bundles["1.1.0"], prefix)
        set_current(prefix, NAME, "1.1.0")
    rounds = Rounds(tmp_path, prefix, keys)
    rounds.serving["version"] = current_version(prefix / "releases" / NAME)
    source = {"older": bundles["1.0.0"], "tampered": bundles["1.2.0"], "truncated": bundles["1.2.0"]}.get(how)
    dropped = rounds.drop(source or bundles[how], name=f"{how}.lmpack")
    if how == "tampered":  # one byte of the largest file changed, the archive rewritten whole: only its hash says so
        with tarfile.open(source) as archive:
            members = [(m, archive.extractfile(m).read() if m.isfile() else None) for m in archive.getmembers()]
        victim = max(members, key=lambda pair: pair[0].size)[0]
        with tarfile.open(dropped, "w:gz") as rewritten:
            for member, content in members:
                if member is victim:
                    content = content[:100] + bytes([content[100] ^ 0xFF]) + content[101:]
                rewritten.addfile(member, io.BytesIO(content) if content is not None else None)
    if how == "truncated":
        dropped.write_bytes(dropped.read_bytes()[: dropped.stat().st_size // 2])
    steps = rounds.settle()
    assert steps == ["update-received", "update-rejected"], steps
    reason = rounds.reason("rejected", dropped.name)
    assert fragment in reason and rounds.events[-1]["reason"] == reason.strip()
    assert rounds.switches == [] and not is_installed(prefix, NAME, "1.2.0") and not is_installed(prefix, NAME, "1.3.0")
    assert current_version(prefix / "releases" / NAME) == rounds.serving["version"]
    rounds.drop(bundles["1.2.0"])  # the next good bundle is still taken
    assert rounds.settle() == ["update-received", "update-installed", "update-switching", "update-switched"]


def test_a_full_disk_rejects_the_bundle_and_the_next_one_is_taken(bundles, keys, tmp_path, monkeypatch):
    from collections import namedtuple

    from lmpack.bundle import install as installing

    prefix = make_prefix(tmp_path, bundles, keys)
    rounds = Rounds(tmp_path, prefix, keys)
    usage, real = namedtuple("usage", "total used free"), installing.shutil.disk_usage
    monkeypatch.setattr(installing.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    rounds.drop(bundles["1.1.0"])
    assert rounds.settle() == ["update-received", "update-rejected"]
    assert "MB free" in rounds.reason("rejected", bundles["1.1.0"].name) and not is_installed(prefix, NAME, "1.1.0")
    monkeypatch.setattr(installing.shutil, "disk_usage", real)
    rounds.drop(bundles["1.2.0"])
    assert rounds.settle()[-1] == "update-switched" and rounds.switches == ["1.2.0"]


def test_a_bundle_whose_install_was_killed_is_taken_again_by_the_next_agent(bundles, keys, tmp_path, monkeypatch):
    """The kill is an exception out of the extraction, which nothing in the inbox catches, as nothing catches a
    SIGKILL (tests/bundle/test_bundle_crash.py kills real installer processes): the bundle stays in the inbox,
    the prefix keeps 1.0.0 current, and the next agent's first rounds finish the update."""
    from lmpack.bundle import verify

    prefix = make_prefix(tmp_path, bundles, keys)
    rounds = Rounds(tmp_path, prefix, keys)
    real_drain, calls = verify.drain, []

    class Killed(BaseException):
        pass

    def dying_drain(stream, entry, fd=None):
        calls.append(entry.path)
        if len(calls) == 3:
            raise Killed
        return real_drain(stream, entry, fd)

    monkeypatch.setattr(verify, "drain", dying_drain)
    rounds.drop(bundles["1.1.0"])
    rounds.inbox.poll()
    rounds.now += 1.5
    with pytest.raises(Killed):
        rounds.inbox.poll()
    monkeypatch.setattr(verify, "drain", real_drain)
    assert (rounds.inbox_dir / bundles["1.1.0"].name).is_file() and not is_installed(prefix, NAME, "1.1.0")
    assert current_version(prefix / "releases" / NAME) == "1.0.0"
    steps = Rounds(tmp_path, prefix, keys).settle()  # a new agent on the same inbox and prefix
    assert steps == ["update-received", "update-installed", "update-switching", "update-switched"], steps
    assert is_installed(prefix, NAME, "1.1.0") and not (prefix / ".staging").exists()


def test_install_only_waits_for_the_operator_and_a_window_holds_the_switch(bundles, keys, tmp_path):
    prefix = make_prefix(tmp_path, bundles, keys)
    rounds = Rounds(tmp_path, prefix, keys, policy="install-only")
    rounds.drop(bundles["1.1.0"])
    assert rounds.settle() == ["update-received", "update-installed", "update-awaiting-switch"]
    assert rounds.switches == [] and "lmpack switch tiny 1.1.0" in rounds.events[-1]["reason"]

    night = Rounds(tmp_path / "night", prefix, keys, window=(22 * 60, 4 * 60))
    night.minutes = 12 * 60  # noon: outside 22:00-04:00
    night.drop(bundles["1.2.0"])
    assert night.settle() == ["update-received", "update-installed", "update-waiting-for-window"]
    assert night.inbox.status()["waiting_for_window"] == "1.2.0" and night.switches == []
    night.drop(bundles["1.1.0"])  # an older one arriving later does not replace it
    assert night.settle()[-1] == "update-waiting-for-window" and night.inbox.status()["waiting_for_window"] == "1.2.0"
    night.minutes = 23 * 60 + 30
    night.inbox.poll()
    assert night.switches == ["1.2.0"] and night.inbox.status()["waiting_for_window"] is None


def test_updates_config_is_checked(tmp_path):
    config = tmp_path / "agent.toml"
    base = 'schema_version = 1\n[server]\nprefix = "/opt/lmpack"\nrelease = "tiny"\n'
    config.write_text(base + '[updates]\ninbox = "in"\npublic_key = "k.pub"\nwindow = "02:00-05:30"\n')
    updates = load_agent_config(config).updates
    assert updates is not None and updates.window == (120, 330) and updates.inbox == tmp_path / "in"
    for bad, message in [
        ('window = "2am"', "must look like"),
        ('window = "05:00-05:00"', "empty"),
        ('policy = "yolo"', "policy"),
    ]:
        config.write_text(base + f'[updates]\ninbox = "in"\npublic_key = "k.pub"\n{bad}\n')
        with pytest.raises(ConfigError, match=message):
            load_agent_config(config)
    config.write_text('schema_version = 1\n[server]\nvariant = "v"\n[updates]\ninbox = "in"\npublic_key = "k.pub"\n')
    with pytest.raises(ConfigError, match="needs \\[server\\] prefix and release"):
        load_agent_config(config)


# --- the real agent -----------------------------------------------------------------------------------------


def inbox_config(tmp: Path, prefix: Path, keys: dict[str, Path], hook_url: str) -> Path:
    return write_config(
        tmp,
        None,
        server_port=free_port(),
        agent_port=free_port(),
        serve_args=[],
        release=(prefix, NAME),
        extra=f"""
[switch]
probation_seconds = 30
probation_failures = 2
alert_window_seconds = 3
backend_wait_seconds = 30

[updates]
inbox = "{tmp / "inbox"}"
public_key = "{keys["public"]}"
settle_seconds = 1.0
poll_seconds = 0.2

[[notifiers]]
type = "webhook"
url = "{hook_url}"
timeout_seconds = 2
retries = 1
""",
    )


def test_an_update_copied_slowly_is_switched_to_under_load_with_no_failed_request(
    bundles, keys, tmp_path, capsys, lmpack_cli
):
    prefix = make_prefix(tmp_path, bundles, keys)
    (tmp_path / "inbox").mkdir()
    with WebhookReceiver() as hook, run_agent(inbox_config(tmp_path, prefix, keys, hook.url), tmp=tmp_path) as agent:
        with Load(agent.server_url) as load:
            time.sleep(0.5)
            data, target = bundles["1.1.0"].read_bytes(), tmp_path / "inbox" / bundles["1.1.0"].name
            copied = time.monotonic()
            for start in range(0, len(data), len(data) // 5 + 1):  # as from slow removable media, in place
                with open(target, "ab") as handle:
                    handle.write(data[start : start + len(data) // 5 + 1])
                time.sleep(0.3)
            wait_for(lambda: agent.status()["server"]["version"] == "1.1.0", timeout=60, what="1.1.0 serving")
            took = time.monotonic() - copied
            time.sleep(0.5)
        assert load.failures() == [] and len(load.records) > 20
        assert current_version(prefix / "releases" / NAME) == "1.1.0"
        wait_for(lambda: any(e["alert"] == "update-switched" for e in hook.events), timeout=10, what="the event")
        steps = [e["alert"] for e in hook.events]
        assert steps == ["update-received", "update-installed", "update-switching", "update-switched"], steps
        assert (tmp_path / "inbox" / "done" / target.name).is_file()
        assert agent.status()["updates"]["recent"][-1]["alert"] == "update-switched"
        shown = lmpack_cli("status", "--agent", agent.url).stdout
        assert f"updates  {tmp_path / 'inbox'}: policy switch" in shown and "update-switched 1.1.0" in shown
    with capsys.disabled():
        print(
            f"\n[switch timing] update from the inbox: copied in 5 chunks, serving {took:.1f} s after the copy "
            f"began; {len(load.records)} requests, 0 failed"
        )


def test_an_update_that_keeps_crashing_is_rolled_back_with_an_alert(bundles, keys, tmp_path):
    prefix = make_prefix(tmp_path, bundles, keys)
    (tmp_path / "inbox").mkdir()
    with WebhookReceiver() as hook, run_agent(inbox_config(tmp_path, prefix, keys, hook.url), tmp=tmp_path) as agent:
        staged = tmp_path / "inbox" / f".{bundles['1.1.0'].name}.part"  # written under another name, then renamed
        shutil.copyfile(bundles["1.1.0"], staged)
        os.rename(staged, tmp_path / "inbox" / bundles["1.1.0"].name)
        for _ in range(2):  # two crashes within the probation roll it back
            pid = wait_for(
                lambda: agent.status()["server"]["version"] == "1.1.0" and agent.ready_pid(), timeout=60, what="1.1.0"
            )
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda pid=pid: agent.ready_pid() != pid, timeout=30, what="the crash noticed", every=0.05)
        wait_for(lambda: agent.status()["server"]["version"] == "1.0.0" and agent.ready_pid(), timeout=60, what="1.0.0")
        wait_for(
            lambda: any(e["alert"] == "update-rolled-back" for e in hook.events), timeout=15, what="the rollback event"
        )
        rolled = next(e for e in hook.events if e["alert"] == "update-rolled-back")
        assert rolled["severity"] == "critical" and rolled["version"] == "1.1.0"
        assert current_version(prefix / "releases" / NAME) == "1.0.0"
        # the same bundle again is not switched to: it was rolled back
        shutil.copyfile(bundles["1.1.0"], tmp_path / "inbox" / bundles["1.1.0"].name)
        wait_for(lambda: any(e["alert"] == "update-not-switched" for e in hook.events), timeout=15, what="refusal")
        assert agent.status()["server"]["version"] == "1.0.0"
