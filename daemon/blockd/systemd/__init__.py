"""How blockd talks to systemd: readiness notifications and socket activation.

Both protocols are a few lines of standard library code, so no binding to
libsystemd (or a PyPI wrapper of it) is needed: ``notify`` speaks the
``sd_notify`` datagram protocol, ``activation`` reads ``sd_listen_fds``'s
environment.  Without systemd both are silent no-ops, so the daemon runs the
same way by hand.
"""
