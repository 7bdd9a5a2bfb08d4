"""Frontend: load a transformers model folder (load.py) and trace it to the graph IR (trace.py)."""
