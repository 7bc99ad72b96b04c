"""Integrations with other projects, each in its own module, imported only when used.

    vllm.py   native VeRA adapters in vLLM (a ``vllm.general_plugins`` entry point)
"""
