"""blockd: a storage daemon that owns disk images and commits qcow2 chains live."""

__version__ = "0.1.0"
