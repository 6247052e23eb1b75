"""vgs: test-time search and value-guided decoding for reasoning LLMs on vLLM.

Heavy imports (torch, vllm) are kept out of this module so that the CLI can validate
arguments and print errors quickly.
"""

__version__ = "0.1.0"
