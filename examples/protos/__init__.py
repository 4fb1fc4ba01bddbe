"""Generated code of the examples' protos; regenerate with tools/generate_protos.py."""
