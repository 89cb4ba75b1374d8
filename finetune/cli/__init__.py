"""The command line: its grammar (arguments.py), the verbs (commands.py: parse, call, print) and
the nightly smoke (smoke.py, its bands in smoke_bands.json). Nothing in the package imports it;
it never imports the training stack at its top level, and decides nothing a stage owns."""
