"""MuonQ: LLM pretraining with memory-efficient (8- and 4-bit) Muon optimizers."""

__version__ = "0.1.0"
