"""Code that travels with a served ticket: plain torch, numpy and the standard library only.

tracking/registry.py copies this package into the registered model (`code_paths`, as
the package `lth_portable`), so `mlflow.pyfunc.load_model("models:/NAME@best")` works
where lth-search is not installed. Nothing here may import lth_search or mlflow; use
relative imports between these files.
"""
