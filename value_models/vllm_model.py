"""Deprecated alias of `vgs.vllm_model` (moved; see `value_models._alias`)."""

from value_models._alias import alias

alias(__name__, "vgs.vllm_model")
