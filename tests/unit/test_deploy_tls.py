"""deployctl and TLS, as data: the inventory's `tls`, which certificates to issue or rotate, the
TLS volume a container mounts, and the guarantee that no key reaches env, labels or output.

The certificates are real (``scheduler.certs`` in a temporary directory); no engine, no SSH.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from deploy import config, identity, pki, render, specs, tlsplan
from deploy.context import Context, client_tls
from deploy.errors import ConfigError, DeployError
from deploy.keyfile import Secret
from deploy.link import MasterLink
from deploy.observed import Observed
from deploy.planner import Create, Remove, plan_up
from deploy.tlsplan import Held, Wanted
from scheduler import certs

KEY = Secret("k" * 32)
IMAGES = specs.Images(specs.ImageRef("scheduler-master:hash-a", "sha256:" + "a" * 64),
                      specs.ImageRef("scheduler-slave:hash-b", "sha256:" + "b" * 64))  # fmt: skip
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
PEM = re.compile(r"-----(BEGIN|END) ")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("SCHEDULER_", "DEPLOYCTL_")):
            monkeypatch.delenv(name)


def make_config(hosts: str = "h1 h2 h3", base: Path = Path("/inv"), **sections: Any,
                ) -> config.Config:  # fmt: skip
    data = config.hosts_override({"cluster": {"name": "c"}, **sections}, hosts)
    lookup = {"h1": {"hostname": "10.0.0.1"}, "h2": {"hostname": "10.0.0.2"}}
    return config.from_mapping(data, {"HOME": "/h"}, lambda p: lambda a: lookup.get(a, {}), base)


# ---- the inventory ----------------------------------------------------------------------------


def test_tls_is_on_for_multi_host_clusters_and_off_when_every_host_is_localhost() -> None:
    assert make_config("h1 h2").master.tls is True
    assert make_config("h1").master.tls is True  # one remote host: the traffic leaves here
    assert make_config("localhost").master.tls is False
    assert make_config("h1 h2", master={"tls": False}).master.tls is False
    assert make_config("localhost", master={"tls": True}).master.tls is True


def test_tls_must_be_a_boolean_and_the_ca_lives_beside_the_inventory() -> None:
    with pytest.raises(ConfigError) as caught:
        make_config("h1 h2", master={"tls": "yes"}, env={"SCHEDULER_TLS_KEY": "/x"})
    assert caught.value.problems == (
        "master.tls: expected true or false, got str 'yes'",
        "env.SCHEDULER_TLS_KEY: set by deployctl itself; use the inventory's own keys",
    )  # fmt: skip
    assert make_config().certs_dir == Path("/inv/c.certs")
    assert make_config(cluster={"name": "c", "certs_dir": "pki/c"}).certs_dir == Path("/inv/pki/c")


# ---- which certificates -----------------------------------------------------------------------


def held(name: str, role: str, days_left: float, revoked: bool = False) -> Held:
    return Held(name, role, 0xABC, NOW + dt.timedelta(days=days_left), revoked)


def test_a_certificate_is_issued_when_missing_revoked_of_another_role_or_expiring() -> None:
    have = {
        "ok": held("ok", "worker", 31), "soon": held("soon", "worker", 29.5),
        "gone": held("gone", "worker", -1), "rev": held("rev", "worker", 80, revoked=True),
        "role": held("role", "client", 80),
    }  # fmt: skip
    wanted = [Wanted(n, "worker") for n in ("ok", "soon", "gone", "rev", "role", "new", "new")]
    issues = tlsplan.to_issue(wanted, have, NOW)
    assert [(i.wanted.name, i.reason) for i in issues] == [
        ("soon", "expires in 29 day(s)"), ("gone", "expired"), ("rev", "revoked"),
        ("role", "was issued as client"), ("new", "new"),
    ]  # fmt: skip
    # scale renews nothing early: only what cannot be used any more
    late = tlsplan.to_issue(wanted, have, NOW, dt.timedelta(0))
    assert [i.wanted.name for i in late] == ["gone", "rev", "role", "new"]


def test_the_masters_certificate_names_its_host_as_the_inventory_gives_it_and_loopback() -> None:
    wanted = tlsplan.wanted_master(make_config("h1:2222 h2"))
    assert (wanted.name, wanted.role) == ("c-master", "master")
    assert wanted.addresses == ("h1", "10.0.0.1", "127.0.0.1")  # alias, its HostName, loopback
    data = {"cluster": {"name": "c"}, "master": {"host": "h2", "advertise": "m.example"},
            "hosts": [{"name": "h1"}, {"name": "h2", "address": "192.0.2.2"}]}  # fmt: skip
    cfg = config.from_mapping(data, {"HOME": "/h"}, lambda p: lambda a: {}, Path("/inv"))
    assert tlsplan.wanted_master(cfg).addresses == ("h2", "192.0.2.2", "m.example", "127.0.0.1")
    assert tlsplan.wanted_client(cfg) == Wanted("c-deployctl", "client")


# ---- what containers get ----------------------------------------------------------------------


def test_a_worker_finds_its_files_by_path_in_a_read_only_volume_of_its_own() -> None:
    cfg = make_config()
    mount = specs.TLSMount("c-worker-2-tls", "c-worker-2", "1f")
    spec = specs.worker_spec(cfg, IMAGES, KEY, "h2", 2, mount)
    env = dict(spec.env)
    assert {k: v for k, v in env.items() if k.startswith("SCHEDULER_TLS_")} == {
        "SCHEDULER_TLS_CA": "/etc/scheduler/tls/ca.pem",
        "SCHEDULER_TLS_CERT": "/etc/scheduler/tls/c-worker-2.pem",
        "SCHEDULER_TLS_KEY": "/etc/scheduler/tls/c-worker-2.key",
    }  # fmt: skip
    assert env["SCHEDULER_WORKER_NAME"] == mount.name  # the certificate's name is the worker's
    # the authkey is a file beside them, not a variable `docker inspect` would show
    assert "SCHEDULER_AUTHKEY" not in env
    assert env["SCHEDULER_AUTHKEY_FILE"] == "/etc/scheduler/tls/authkey"
    binds = specs.create_args(spec)["host_config"]["binds"]  # type: ignore[index]
    assert binds == {"c-worker-2-tls": {"bind": "/etc/scheduler/tls", "mode": "ro"}}


def test_the_master_also_gets_the_revocation_list_from_its_mounted_directory() -> None:
    mount = specs.TLSMount("c-master-tls", "c-master", "2a", crl=True)
    spec = specs.master_spec(make_config(), IMAGES, KEY, mount)
    assert dict(spec.env)["SCHEDULER_TLS_CRL"] == "/etc/scheduler/tls/crl.pem"
    binds = specs.create_args(spec)["host_config"]["binds"]  # type: ignore[index]
    assert binds == {"c-state": {"bind": "/var/lib/scheduler", "mode": "rw"},
                     "c-master-tls": {"bind": "/etc/scheduler/tls", "mode": "ro"}}  # fmt: skip


def test_a_new_certificate_changes_the_digest_and_no_tls_leaves_it_as_it_was() -> None:
    cfg = make_config()

    def digest(serial: str | None) -> str:
        mount = specs.TLSMount("v", "c-worker-1", serial) if serial else None
        return specs.worker_spec(cfg, IMAGES, KEY, "h1", 1, mount).digest

    assert digest("1") != digest("2")
    assert digest("1") == digest("1")
    assert digest(None) == specs.worker_spec(cfg, IMAGES, KEY, "h1", 1).digest
    # the authkey is no variable under TLS, yet a new one still replaces the containers
    mount = specs.TLSMount("v", "c-worker-1", "1")
    other = specs.worker_spec(cfg, IMAGES, Secret("o" * 32), "h1", 1, mount)
    assert other.digest != digest("1") and "o" * 32 not in repr(other)


def mounts_from(serials: dict[str, str]) -> Any:
    def mounts(name: str, role: str) -> specs.TLSMount:
        return specs.TLSMount(specs.tls_volume(name), name, serials.get(name, "1"),
                              crl=role == "master")  # fmt: skip
    return mounts


def world_after(actions: list, observed: list[Observed]) -> list[Observed]:
    world = {o.name: o for o in observed}
    for a in actions:
        if isinstance(a, Remove):
            world.pop(a.container.name, None)
        elif isinstance(a, Create):
            s = a.spec
            world[s.name] = Observed(s.host, s.name, s.name, s.role, s.index, "", s.digest,
                                     "running")  # fmt: skip
    return list(world.values())


def test_a_rotated_certificate_replaces_only_its_own_container() -> None:
    cfg = make_config()
    first = plan_up(cfg, IMAGES, KEY, [], 4, {}, tls=mounts_from({}))
    world = world_after(first, [])
    assert plan_up(cfg, IMAGES, KEY, world, 4, {}, tls=mounts_from({})) == []
    rotated = plan_up(cfg, IMAGES, KEY, world, 4, {}, tls=mounts_from({"c-worker-3": "2"}))
    assert [(type(a).__name__, a.host) for a in rotated] == [("Remove", "h2"), ("Create", "h2")]
    assert {getattr(a, "container", None) and a.container.name for a in rotated} - {None} == {
        "c-worker-3"}  # fmt: skip
    master = plan_up(cfg, IMAGES, KEY, world, 4, {}, tls=mounts_from({"c-master": "9"}))
    assert [a.spec.name for a in master if isinstance(a, Create)] == ["c-master"]


def test_the_archive_gives_the_files_to_the_containers_user_with_the_key_0400() -> None:
    files = [tlsplan.TLSFile("ca.pem", b"CA", 0o444), tlsplan.TLSFile("w.key", b"KEY", 0o400)]
    assert "KEY" not in repr(files) and "<3 bytes>" in repr(files[1])
    with tarfile.open(fileobj=io.BytesIO(tlsplan.archive(files, 1e9))) as tar:
        members = {m.name: (m.uid, m.gid, m.mode, tar.extractfile(m).read())  # type: ignore[union-attr]
                   for m in tar.getmembers()}  # fmt: skip
    assert members == {"ca.pem": (10001, 10001, 0o444, b"CA"),
                       "w.key": (10001, 10001, 0o400, b"KEY")}  # fmt: skip


def test_the_uid_is_the_one_the_images_create() -> None:
    install = Path(specs.__file__).parent / "images" / "common" / "install.sh"
    assert f"--uid {tlsplan.CONTAINER_UID} " in install.read_text()


# ---- with a real CA ---------------------------------------------------------------------------


class Echo(list):  # type: ignore[type-arg]
    def __call__(self, line: str) -> None:
        self.append(line)


def ca_context(tmp_path: Path, hosts: str = "h1 h2 h3") -> tuple[Context, Echo]:
    cfg = make_config(hosts, base=tmp_path)
    echo = Echo()
    return Context(cfg, {}, echo, None, None, None), echo  # type: ignore[arg-type]


def plan_with_certs(ctx: Context, observed: list[Observed], count: int, dry_run: bool = False,
                    renew: dt.timedelta = tlsplan.RENEW_WITHIN) -> tuple[list, list]:  # fmt: skip
    def make(mounts: Any) -> list:
        return plan_up(ctx.config, IMAGES, KEY, observed, count, {}, tls=mounts)

    return identity.plan(ctx, make, observed, dry_run, renew)


def test_up_issues_one_certificate_per_container_then_nothing(tmp_path: Path) -> None:
    ctx, echo = ca_context(tmp_path)
    assert identity.ensure_ca(ctx, dry_run=False) is True
    assert stat.S_IMODE(ctx.config.certs_dir.stat().st_mode) == 0o700
    actions, issued = plan_with_certs(ctx, [], 3)
    assert sorted(i.wanted.name for i in issued) == [
        "c-master", "c-worker-1", "c-worker-2", "c-worker-3"]  # fmt: skip
    assert "issued certificate c-worker-2 (worker): new" in echo
    have = pki.held(ctx.config.certs_dir)
    for a in actions:  # every container carries the serial of its own, fresh certificate
        assert a.spec.tls.serial == f"{have[a.spec.name].serial:x}"
        assert have[a.spec.name].role == a.spec.role
    assert stat.S_IMODE((ctx.config.certs_dir / "c-worker-1.key").stat().st_mode) == 0o600
    world = world_after(actions, [])
    again, issued = plan_with_certs(ctx, world, 3)
    assert again == [] and issued == []


def test_a_certificate_expiring_within_30_days_is_reissued_and_only_its_container_replaced(
    tmp_path: Path,
) -> None:  # fmt: skip
    ctx, echo = ca_context(tmp_path)
    identity.ensure_ca(ctx, dry_run=False)
    world = world_after(plan_with_certs(ctx, [], 3)[0], [])
    certs.issue(ctx.config.certs_dir, "c-worker-2", "worker", days=20)  # as if 70 days passed
    current = pki.held(ctx.config.certs_dir)["c-worker-2"].serial
    stale = [Observed(**{**o.__dict__, "digest": specs.worker_spec(
        ctx.config, IMAGES, KEY, o.host, o.index, tlsplan.mount(o.name, o.role, pki.held(
            ctx.config.certs_dir))).digest}) if o.name == "c-worker-2" else o
        for o in world]  # the container runs the 20-day certificate  # fmt: skip
    dry, issued = plan_with_certs(ctx, stale, 3, dry_run=True)
    assert [(i.wanted.name, i.reason) for i in issued] == [("c-worker-2", "expires in 19 day(s)")]
    assert dry == []  # a dry run issues nothing, so nothing changes yet
    actions, issued = plan_with_certs(ctx, stale, 3)
    assert pki.held(ctx.config.certs_dir)["c-worker-2"].serial != current
    assert [(type(a).__name__, getattr(a, "spec", None) and a.spec.name) for a in actions] == [
        ("Remove", None), ("Create", "c-worker-2")]  # fmt: skip
    assert actions[0].container.name == "c-worker-2"
    assert plan_with_certs(ctx, stale, 3, renew=dt.timedelta(0))[1] == []  # scale: none


def test_a_dry_run_shows_the_certificates_and_volumes_it_would_make(tmp_path: Path) -> None:
    ctx, echo = ca_context(tmp_path)
    assert identity.ensure_ca(ctx, dry_run=True) is True
    assert not ctx.config.certs_dir.exists()
    assert echo == [f"dry run: would create the cluster CA in {ctx.config.certs_dir}"]
    actions, issued = plan_with_certs(ctx, [], 2, dry_run=True)
    text = render.plan(actions, (), issued)
    assert text.splitlines()[0] == "issue certificate c-master (master): new"
    assert ("tls c-worker-1-tls:/etc/scheduler/tls:ro (certificate to be issued)"
            in text)  # fmt: skip
    assert not ctx.config.certs_dir.exists()


def test_no_key_material_in_env_labels_arguments_or_plans(tmp_path: Path) -> None:
    """Everything a container's configuration (what `docker inspect` shows) and deployctl's
    plan are made of, with real certificates issued: paths and serials, never a PEM block."""
    ctx, _ = ca_context(tmp_path)
    identity.ensure_ca(ctx, dry_run=False)
    actions, _ = plan_with_certs(ctx, [], 3)
    secrets = [p.read_text() for p in ctx.config.certs_dir.glob("*.key")]
    bodies = [line for s in secrets for line in s.splitlines() if not line.startswith("-----")]
    assert len(secrets) == 5 and bodies  # the CA's, the master's and three workers'
    shown = [render.plan(actions, (), [])]
    for a in actions:
        args = specs.create_args(a.spec)
        assert "SCHEDULER_AUTHKEY" not in args["environment"]  # type: ignore[operator]
        shown += [repr(args["environment"]), repr(args["labels"]), repr(args["host_config"]),
                  repr(a.spec)]  # fmt: skip
        files = pki.files(ctx.config.certs_dir, a.spec.tls)
        shown.append(repr(files))
        assert {f.name: f.mode for f in files}[f"{a.spec.name}.key"] == 0o400
    for text in shown:
        assert not PEM.search(text), text
        assert KEY.reveal() not in text
        assert not any(body in text for body in bodies)


def test_deployctls_own_certificate_is_issued_once_and_rotated_on_up(tmp_path: Path) -> None:
    ctx, echo = ca_context(tmp_path)
    with pytest.raises(DeployError, match="no CA there; run 'deployctl init'"):
        client_tls(ctx.config, echo)
    identity.ensure_ca(ctx, dry_run=False)
    ca, cert, key = client_tls(ctx.config, echo)  # type: ignore[misc]
    assert (ca.name, cert.name, key.name) == ("ca.pem", "c-deployctl.pem", "c-deployctl.key")
    serial = pki.held(ctx.config.certs_dir)["c-deployctl"].serial
    client_tls(ctx.config, echo, tlsplan.RENEW_WITHIN)
    assert pki.held(ctx.config.certs_dir)["c-deployctl"].serial == serial
    certs.issue(ctx.config.certs_dir, "c-deployctl", "client", days=3)
    client_tls(ctx.config, echo)  # not expired yet: kept until `up`
    assert pki.held(ctx.config.certs_dir)["c-deployctl"].not_after < pki.now() + dt.timedelta(4)
    client_tls(ctx.config, echo, tlsplan.RENEW_WITHIN)
    assert pki.held(ctx.config.certs_dir)["c-deployctl"].not_after > pki.now() + dt.timedelta(80)
    assert client_tls(make_config("localhost", base=tmp_path), echo) is None


def test_the_master_link_hands_the_client_its_certificate_paths_only(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def connect(**kwargs: Any) -> object:
        seen.append(kwargs)
        return object()

    cfg = make_config("localhost")
    files = (tmp_path / "ca.pem", tmp_path / "me.pem", tmp_path / "me.key")
    process: dict[str, str] = {"PATH": "/bin"}
    MasterLink(cfg, None, connect, tls=lambda: files, environ=process).open(KEY)  # type: ignore[arg-type]
    paths = {"SCHEDULER_TLS_CA": str(files[0]), "SCHEDULER_TLS_CERT": str(files[1]),
             "SCHEDULER_TLS_KEY": str(files[2])}  # fmt: skip
    assert process == {"PATH": "/bin", **paths}  # where the scheduler's transport reads them
    plain: dict[str, str] = {}
    MasterLink(cfg, None, connect, tls=lambda: None, environ=plain).open(KEY)  # type: ignore[arg-type]
    assert plain == {}
    assert seen == [{"master": "127.0.0.1:8888", "authkey": KEY.reveal()}] * 2


def test_init_makes_the_ca_once_and_keeps_an_existing_one(tmp_path: Path) -> None:
    cfg = make_config(base=tmp_path)
    assert identity.init(cfg) == f"CA created: {cfg.certs_dir}"
    before = (cfg.certs_dir / "ca.key").read_bytes()
    assert identity.init(cfg) == f"CA already there (kept): {cfg.certs_dir}"
    with pytest.raises(DeployError, match="already hold a CA; it is kept"):
        pki.init(cfg.certs_dir)
    assert (cfg.certs_dir / "ca.key").read_bytes() == before
    assert "without TLS" in identity.init(make_config("localhost", base=tmp_path))


def test_revoke_names_a_worker_of_this_cluster(tmp_path: Path) -> None:
    ctx, _ = ca_context(tmp_path)
    assert identity.worker_certificate(ctx, "worker-3") == "c-worker-3"
    assert identity.worker_certificate(ctx, "c-worker-3") == "c-worker-3"
    for bad in ("master", "c-master", "worker-x", "c-deployctl"):
        with pytest.raises(DeployError, match="not a worker of this cluster"):
            identity.worker_certificate(ctx, bad)
    local, _ = ca_context(tmp_path, "localhost")
    with pytest.raises(DeployError, match="runs without TLS"):
        identity.revoke(local, "worker-1", [], set())


def test_the_example_inventory_documents_tls_and_certs_dir(tmp_path: Path) -> None:
    example = (Path(specs.__file__).parents[1] / "cluster.example.toml").read_text()
    on = re.sub(r"^# (tls|certs_dir) = ", r"\1 = ", example, flags=re.M)
    assert on.count("\ntls = true") == 1 and on.count("\ncerts_dir = ") == 1
    (tmp_path / "cluster.toml").write_text(on)
    cfg = config.load(tmp_path / "cluster.toml", {"HOME": "/h"}, lambda p: lambda a: {})
    assert cfg.master.tls is True and cfg.certs_dir == tmp_path / "demo.certs"
