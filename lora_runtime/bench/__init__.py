"""``lora-runtime bench``: one module per suite, each measuring its rows side by side in one run.

``default`` (the bench-size default model: switches, limits, peers, run cost), ``bundle`` (a given bundle),
``llm`` (SmolLM2 decode, prefill, switches), ``scale`` (the 1B-class default model). ``timing`` measures,
``report`` turns rows into ratios, tables and plots; ``lora_runtime.cli`` picks the suite.
"""
