"""The lottery loop: a lineage's stages, their keys, its kinds, the walk and the verdict.

keys.py (every stage key, the only place one is built), stages.py (fetch or train one
stage), kinds.py (the registry of lineage kinds), walk.py (ONE walk over N lineages),
objective.py (the verdict and the score), results.py (what a lineage reports), probes.py
(diagnostics per round). docs/architecture.md follows one round through them.
"""
