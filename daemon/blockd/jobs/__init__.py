"""Long-running block jobs: the state machine every job kind shares, and its registry."""
