"""Layer 2: the data system's memory -- an arena file in /dev/shm, its allocator, blob layout."""

from .allocator import Allocator
from .arena import ArenaFile, ArenaMap
from .blob import BlobPlan, plan_blob, read_blob, write_blob

__all__ = ["Allocator", "ArenaFile", "ArenaMap", "BlobPlan", "plan_blob", "read_blob", "write_blob"]
