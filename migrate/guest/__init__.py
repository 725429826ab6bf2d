"""Guest images: a tiny freestanding runtime and its workloads.

The image is built from ``src/`` by ``make -C migrate/guest`` (the project's
setup does it).  :mod:`migrate.guest.boot` loads it and sets up long mode;
specs/guest-boot.md is the contract between the two sides.
"""
from .boot import (BOOT_INFO_ADDR, IMAGE_BASE, WORKLOAD_BASE, WORKLOADS, BootInfo,
                   image_path, load_image)

__all__ = ["BOOT_INFO_ADDR", "IMAGE_BASE", "WORKLOAD_BASE", "WORKLOADS", "BootInfo",
           "image_path", "load_image"]
