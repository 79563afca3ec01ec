"""The SIREN guard: a frozen causal LM's pooled safety neurons, scored by a small MLP."""
