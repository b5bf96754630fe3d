"""Talk to a model: a finished run (base + adapters, no merge), a merged export, or a bare model."""
