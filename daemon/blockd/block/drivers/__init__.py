"""Block drivers: ``file`` (protocol), ``raw`` and ``qcow2`` (formats)."""
