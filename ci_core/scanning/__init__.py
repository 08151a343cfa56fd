"""The scan stage: inverting a trigger per class, the reference, scoring, the report and its files."""
