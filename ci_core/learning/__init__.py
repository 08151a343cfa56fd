"""The paper's protocol: the class splits, CoCoOp prompt tuning, and clean accuracy / attack success rate."""
