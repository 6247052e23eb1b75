"""Deprecated alias of `vgs.modeling` (moved; see `value_models._alias`)."""

from value_models._alias import alias

alias(__name__, "vgs.modeling")
