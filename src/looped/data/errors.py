"""The data package's one exception, `DataError` (defined in `looped.errors`, where the CLI catches it); its
message names the file, line or shard at fault."""

from looped.errors import DataError

__all__ = ["DataError"]
