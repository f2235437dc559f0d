"""The machinery behind `SAM2VideoPredictor`: session bookkeeping and per-frame model calls."""
