"""Repairers: fine-tune a flagged model's prompt learner so that its (reconstructed) trigger stops working."""
