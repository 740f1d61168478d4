"""Errors raised by the state map. Each message names the file and what was wrong."""


class StateMapError(Exception):
    """Base class: the state map could not be used as asked."""


class StateMapCorrupt(StateMapError):
    """The file is not a usable state map (truncated, bad magic, both slots bad).

    Never treated as "clean": a map that cannot be read proves nothing about which
    regions are in sync, so the operator must decide (``gmd init --force`` plus a
    full copy from a known-good member).
    """


class StateMapVersionError(StateMapError):
    """The file was written by a newer gmd with a format this one cannot read."""


class GeometryMismatch(StateMapError):
    """The map describes a different volume than the configuration does."""

    def __init__(self, path: str, field: str, on_disk: object, expected: object):
        self.path = path
        self.field = field
        self.on_disk = on_disk
        self.expected = expected
        super().__init__(
            f"{path}: state map {field} is {on_disk!r} but the configuration says "
            f"{expected!r}; refusing to use a map of another geometry"
        )


class StateMapFull(StateMapError):
    """No free member slot, or the superblock would outgrow its slot."""
