"""gmd: host-based volume mirroring.

The mirror device: configuration, the volume engine, member links, copy engines,
the FUSE front, the node daemon and its control socket. Uses ``statemap``,
``transport`` and ``quorum``; they never import this package.
"""

__version__ = "0.1.0"
