"""blockctl: a command line for people, a QMP client of a running blockd.

It speaks only QMP over the control socket (through the ``qemu.qmp`` library)
and imports nothing of the daemon, so it works the same against a blockd of
another version or against qemu-storage-daemon.
"""
