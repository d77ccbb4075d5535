"""The `calibrl` commands, one module each (train, sft, eval, plot, probe, demo), each callable from Python.

Every module has `add_arguments(parser)` (or, for the config-file commands train and sft, `CONFIG_TYPES`) and
`run(namespace)`, which `calibrl.cli` wires into the command line, plus the public functions it is made of.
"""
