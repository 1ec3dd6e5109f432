"""An example ncbench plugin package: one method, registered under the ``ncbench.methods`` entry-point group."""
