"""The Pi install as the README writes it, in a throwaway root: `make install-system` lays down
the unit, sysusers and tmpfiles entries and the example config with the ownership the service
needs, and `gatewayd check` then works as the service user (setpriv, like systemd's User=).
The sdist carries those files. The unit's ProcSubset=pid does not hide the default route from
the Operations Hub gateway id (checked in a real mount namespace with procfs subset=pid).

Not here: starting the unit under a running systemd (this machine has none as PID 1, so
systemd-run cannot start transient units); `systemd-analyze verify/security` cover the unit file.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT

VENV_BIN = Path(sys.executable).parent
SETPRIV = shutil.which("setpriv")
UNSHARE = shutil.which("unshare")


def _readme_install_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Install on a Raspberry Pi"):]
    block = section[section.index("```sh") + 5:]
    block = block[:block.index("```")]
    return [ln.split("  #")[0].strip() for ln in block.strip().splitlines()]


def _ids(root: Path, name: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        f = line.split(":")
        if f[0] == name:
            return int(f[2]), int(f[3])
    raise AssertionError(f"no {name} user in {root}/etc/passwd")


def _gid(root: Path, name: str) -> int:
    for line in (root / "etc/group").read_text().splitlines():
        f = line.split(":")
        if f[0] == name:
            return int(f[2])
    raise AssertionError(f"no {name} group in {root}/etc/group")


def _owner_mode(p: Path) -> tuple[int, int, int]:
    st = p.stat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@pytest.fixture
def sysroot() -> Iterator[Path]:
    # Not under pytest's tmp_path: that is 0700 root, and the service user must reach the config.
    root = Path(tempfile.mkdtemp(prefix="gatewayd-root-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root)


def _as_service_user(root: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    uid, gid = _ids(root, "gatewayd")
    assert SETPRIV is not None, "setpriv (util-linux) is missing"
    return subprocess.run([SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": "/nonexistent",
                               "PYTHONDONTWRITEBYTECODE": "1"})


@pytest.mark.skipif(os.geteuid() != 0, reason="installing system files needs root (CI runs as root)")
def test_readme_install_section_in_a_throwaway_root(sysroot: Path) -> None:
    lines = _readme_install_lines()
    assert "sudo make install-system" in lines
    check_lines = [ln for ln in lines if ln.startswith("sudo -u gatewayd gatewayd check")]
    assert check_lines, lines
    for line in lines:
        if line == "sudo make install-system":
            proc = subprocess.run(["make", "install-system", f"DESTDIR={sysroot}",
                                   f"GATEWAYD_BIN={VENV_BIN / 'gatewayd'}"],
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        elif line.startswith("sudo -u gatewayd "):
            # `sudo -u gatewayd` is setpriv with the ids the install created; paths in the root.
            argv = line.removeprefix("sudo -u gatewayd ").split()
            argv = [str(sysroot) + a if a.startswith("/etc/") else a for a in argv]
            argv[0] = str(sysroot / "usr/bin/gatewayd")
            proc = _as_service_user(sysroot, argv)
            assert proc.returncode == 0, proc.stderr
            assert "config OK" in proc.stderr
        # apt-get, the venv and pip install: the venv running this suite stands for them.

    uid, gid = _ids(sysroot, "gatewayd")
    assert gid == _gid(sysroot, "gatewayd") and uid != 0
    etc = sysroot / "etc/gatewayd"
    assert _owner_mode(etc) == (0, gid, 0o750)
    assert _owner_mode(etc / "gatewayd.toml") == (0, gid, 0o640)
    assert _owner_mode(etc / "credentials") == (0, 0, 0o700)
    assert _owner_mode(sysroot / "var/lib/gatewayd") == (uid, gid, 0o750)
    assert (etc / "gatewayd.toml").read_text() == (ROOT / "config.example.toml").read_text()
    unit = sysroot / "etc/systemd/system/gatewayd.service"
    assert unit.read_text() == (ROOT / "systemd/gatewayd.service").read_text()
    assert os.readlink(sysroot / "usr/bin/gatewayd") == str(VENV_BIN / "gatewayd")
    for sub in ("sysusers.d", "tmpfiles.d"):
        assert _owner_mode(sysroot / f"usr/lib/{sub}/gatewayd.conf")[2] == 0o644
    groups = (sysroot / "etc/group").read_text()
    for group in ("dialout", "i2c", "gpio"):  # the unit's SupplementaryGroups= must exist
        line = next(ln for ln in groups.splitlines() if ln.startswith(group + ":"))
        assert "gatewayd" in line.split(":")[3].split(","), line

    # The service user reads the config but cannot change it, nor read the credentials.
    proc = _as_service_user(sysroot, [sys.executable, "-c", (
        "import os, sys; c = sys.argv[1]; open(c).read();"
        "assert not os.access(c, os.W_OK); assert not os.access(sys.argv[2], os.R_OK)"),
        str(etc / "gatewayd.toml"), str(etc / "credentials")])
    assert proc.returncode == 0, proc.stderr

    # Running the install again keeps an edited config, and puts its ownership right.
    (etc / "gatewayd.toml").write_text((ROOT / "config.example.toml").read_text() + "\n# edited\n")
    os.chown(etc / "gatewayd.toml", 0, 0)
    (etc / "gatewayd.toml").chmod(0o600)
    proc = subprocess.run(["make", "install-system", f"DESTDIR={sysroot}",
                           f"GATEWAYD_BIN={VENV_BIN / 'gatewayd'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (etc / "gatewayd.toml").read_text().endswith("# edited\n")
    assert _owner_mode(etc / "gatewayd.toml") == (0, gid, 0o640)

    # At boot the tmpfiles entry repairs the same modes.
    (etc / "gatewayd.toml").chmod(0o600)
    os.chown(etc / "gatewayd.toml", 0, 0)
    proc = subprocess.run(["systemd-tmpfiles", f"--root={sysroot}", "--create",
                           str(sysroot / "usr/lib/tmpfiles.d/gatewayd.conf")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert _owner_mode(etc / "gatewayd.toml") == (0, gid, 0o640)


@pytest.mark.skipif(os.geteuid() != 0, reason="installing system files needs root (CI runs as root)")
def test_the_old_install_left_the_service_unable_to_read(sysroot: Path) -> None:
    """What the README said before: config 0640 root:root. The service user cannot read it."""
    proc = subprocess.run(["make", "install-system", f"DESTDIR={sysroot}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = sysroot / "etc/gatewayd/gatewayd.toml"
    os.chown(cfg, 0, 0)
    proc = _as_service_user(sysroot, [str(VENV_BIN / "gatewayd"), "check", "--no-secrets",
                                      "-c", str(cfg)])
    assert proc.returncode == 78 and "Permission denied" in proc.stderr


def test_sdist_ships_the_system_files(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation",
                           "--outdir", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (sdist,) = tmp_path.glob("gatewayd-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"systemd/gatewayd.service", "systemd/gatewayd.sysusers", "systemd/gatewayd.tmpfiles",
            "systemd/install.sh", "config.example.toml", "Makefile"} <= names, sorted(names)


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root (CI runs as root)")
def test_gateway_id_reads_the_default_route_under_procsubset_pid() -> None:
    """The unit's ProcSubset=pid mounts procfs with subset=pid: /proc/net is gone there. In a
    network namespace whose default route is on `zzz0` (and `aaa0`, sorted first, is not it), the
    Operations Hub gateway id must still be zzz0's MAC."""
    assert UNSHARE is not None, "unshare (util-linux) is missing"
    script = (
        "set -e; ip link add aaa0 type veth peer name zzz0; ip link set aaa0 up; ip link set zzz0 up;"
        "ip route add default dev zzz0; mount -t sysfs sysfs /sys;"
        "mount -t proc -o subset=pid proc /proc; test ! -e /proc/net;"
        "cat /sys/class/net/zzz0/address;"
        f"{sys.executable} -c 'from gatewayd.uplinks.opshub.codec import primary_mac; print(primary_mac())'")
    proc = subprocess.run([UNSHARE, "-m", "-n", "-p", "--fork", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    mac, gateway_id = proc.stdout.split()
    assert gateway_id == mac.replace(":", "-")
