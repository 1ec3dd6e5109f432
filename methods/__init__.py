"""Built-in methods, installed as ``ncbench.methods`` and registered through entry points."""
