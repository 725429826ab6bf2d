"""Build hooks: the cffi extension (migrate.kvm._kvm) and the guest images.

Both are compiled from source with the machine's gcc whenever the package is
built or installed (including `pip install -e .`).
"""
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


class BuildExtWithGuests(build_ext):
    def run(self):
        subprocess.run(["make", "-s", "-C", str(HERE / "migrate" / "guest")], check=True)
        super().run()
        if not self.inplace:
            self._copy_guest_images()

    def _copy_guest_images(self):
        src = HERE / "migrate" / "guest" / "images" / "guest.bin"
        dst = Path(self.build_lib) / "migrate" / "guest" / "images"
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "guest.bin").write_bytes(src.read_bytes())


setup(
    cffi_modules=["migrate/kvm/_build.py:ffibuilder",
                  "migrate/guest/_build_check.py:ffibuilder"],
    cmdclass={"build_ext": BuildExtWithGuests},
)
