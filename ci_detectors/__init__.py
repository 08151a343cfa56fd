"""First-party detector and scorer plugins: CLIP-Inspector (``ci``)."""
