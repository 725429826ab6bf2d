"""Build hooks: the cffi extensions and the guest and stub images.

Both are compiled from source with the machine's gcc whenever the package is
built or installed (including `pip install -e .`).
"""
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


class BuildExtWithGuests(build_ext):
    IMAGES = (("guest", "guest.bin"), ("stub", "stub.bin"))

    def run(self):
        for folder, _ in self.IMAGES:
            subprocess.run(["make", "-s", "-C", str(HERE / "migrate" / folder)], check=True)
        super().run()
        if not self.inplace:
            self._copy_images()

    def _copy_images(self):
        for folder, name in self.IMAGES:
            src = HERE / "migrate" / folder / "images" / name
            dst = Path(self.build_lib) / "migrate" / folder / "images"
            dst.mkdir(parents=True, exist_ok=True)
            (dst / name).write_bytes(src.read_bytes())


setup(
    cffi_modules=["migrate/kvm/_build.py:ffibuilder",
                  "migrate/guest/_build_check.py:ffibuilder",
                  "migrate/stream/_build_pages.py:ffibuilder",
                  "migrate/dataplane/_build.py:ffibuilder"],
    cmdclass={"build_ext": BuildExtWithGuests},
)
