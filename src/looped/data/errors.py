"""The data package's one exception, `DataError`, whose message names the file, line or shard at fault."""


class DataError(ValueError):
    """Data that cannot be read, prepared or loaded; the message says where and, when it can, what to do."""
