"""Infer tasks: parse the request, call the engine, write the label file."""
