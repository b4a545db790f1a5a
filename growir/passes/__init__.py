"""The growth passes: each reads analysis facts about the graph and writes per-tensor rules (index maps, scales,
fills); ``pipeline`` orders them (see docs/design.md)."""
