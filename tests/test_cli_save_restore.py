"""hvm save / restore / stream through click's CliRunner, plus one real subprocess."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from migrate.cli import hvm, parse_compress
from migrate.domain import DomainConfig
from migrate.host import control



def test_parse_compress():
    assert parse_compress("none") == "none"
    assert parse_compress("Auto") == "auto"
    assert parse_compress("zstd") == "zstd:1"       # the engine's default level
    assert parse_compress("zstd:19") == "zstd:19"
    for bad in ("gzip", "zstd:99", "zstd:x", "none:1", "auto:3"):
        with pytest.raises(Exception, match="use auto, none, zstd"):
            parse_compress(bad)


@pytest.mark.kvm
def test_cli_save_restore_stream(state_dir, tmp_path):
    run = CliRunner().invoke
    control.create_domain(DomainConfig("c1", "idle", 16 << 20))
    path = tmp_path / "c1.hvm"
    try:
        res = run(hvm, ["save", "c1", str(path), "--checkpoint", "--compress", "zstd:1"])
        assert res.exit_code == 0, res.output
        assert res.output.startswith(f"saved c1 to {path}: ") and "sent" in res.output
        assert "domain running" in res.output
        res = run(hvm, ["save", "c1", str(tmp_path / "no" / "x.hvm")])
        assert res.exit_code == 1 and "does not exist" in res.output
        res = run(hvm, ["save", "c1", str(path), "--compress", "lz4"])
        assert res.exit_code == 2
        res = run(hvm, ["save", "c1", str(path), "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["status"] == "destroyed"

        res = run(hvm, ["stream", "verify", str(path)])
        assert res.exit_code == 0 and "ok (" in res.output
        res = run(hvm, ["stream", "inspect", str(path)])
        assert "MEMORY_LAYOUT" in res.output and "GUEST: 4096 pages" in res.output
        res = run(hvm, ["stream", "dump", str(path)])
        assert "PAGE_DATA_ZSTD x" in res.output and "rip: 0x" in res.output

        bad = tmp_path / "bad.hvm"
        bad.write_bytes(path.read_bytes()[:-30])
        res = run(hvm, ["stream", "verify", str(bad)])
        assert res.exit_code == 1 and "Error: input ended before END" in res.output
        assert len(res.output.strip().splitlines()) == 1

        res = run(hvm, ["restore", str(path), "--name", "c2", "--paused"])
        assert res.exit_code == 0, res.output
        assert "restored c2" in res.output and "paused" in res.output
        res = run(hvm, ["restore", str(path), "--name", "c4", "--fresh-stub"])
        assert res.exit_code == 0, res.output
        assert "restored c4" in res.output and "running" in res.output
        res = run(hvm, ["restore", str(bad), "--name", "c3"])
        assert res.exit_code == 1 and "failed to restore" in res.output
        assert not (state_dir / "c3").exists()
    finally:
        for name in ("c1", "c2", "c4"):
            try:
                with control.DomainClient(name) as c:
                    c.call("destroy")
                control.wait_gone(name)
            except control.ControlError:
                pass


@pytest.mark.kvm
def test_real_subprocess_save_and_restore(state_dir, tmp_path):
    control.create_domain(DomainConfig("s1", "idle", 16 << 20))
    path = tmp_path / "s1.hvm"
    env_run = [sys.executable, "-m", "migrate.cli"]
    try:
        out = subprocess.run(env_run + ["save", "s1", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "saved s1" in out.stdout and path.exists()
        out = subprocess.run(env_run + ["restore", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "restored s1" in out.stdout and "running" in out.stdout
    finally:
        try:
            with control.DomainClient("s1") as c:
                c.call("destroy")
            control.wait_gone("s1")
        except control.ControlError:
            pass
