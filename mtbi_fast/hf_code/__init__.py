"""The code an exported model folder carries (``mtbi-fast export``): transformers classes that
depend on torch and transformers only, copied into the folder and named in its ``auto_map``."""
