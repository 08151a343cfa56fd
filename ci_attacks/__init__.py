"""First-party attack plugins (they register through the same entry points a third party uses)."""
