"""Training of token-level value models: data collection (roll-ins, roll-outs, labels),
preparation, training (DDP/FSDP), export, Q# rounds and A*-PO. The model class itself lives in
`vgs.modeling`."""
