"""`tensorforge analyze`: a structural map of a source tree (modules, imports, cycles, entry
points), optionally summarised module by module by a model behind the gateway."""
