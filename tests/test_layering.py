"""The layers keep to themselves: the client loads no KVM, stub, data plane or zstd code,
and the configuration module imports nothing of the project (migrate.config)."""
import subprocess
import sys

from migrate import config, dataplane

HEAVY = ("migrate.kvm", "migrate.stub", "migrate.dataplane", "migrate.domain", "migrate.engine",
         "migrate.stream", "migrate.cpu", "migrate.guest", "zstandard", "_cffi_backend")


def _loaded_by(code: str) -> list[str]:
    probe = (f"import sys\n{code}\n"
             "print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return out.split()


def test_the_client_imports_no_kvm_stub_or_data_plane_code():
    loaded = _loaded_by("from migrate.cli import hvm")
    assert "migrate.host.control" in loaded             # the probe saw the client
    assert [m for m in loaded if m.startswith(HEAVY)] == []


def test_hvm_list_runs_without_them(tmp_path):
    code = ("import os\nos.environ['HVM_STATE_DIR'] = %r\nfrom migrate.cli import hvm\n"
            "try:\n    hvm(['list'])\nexcept SystemExit as e:\n    assert not e.code, e.code" % str(tmp_path))
    loaded = _loaded_by(code)
    assert [m for m in loaded if m.startswith(HEAVY)] == []


def test_config_imports_nothing_of_the_project():
    loaded = _loaded_by("import migrate.config")
    assert [m for m in loaded if m.startswith("migrate.") and m != "migrate.config"] == []


def test_compression_codes_are_the_data_planes():
    assert config.COMPRESSION_MODES == dataplane.MODES
