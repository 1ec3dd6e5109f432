"""Dataset adapters of ncbench."""
