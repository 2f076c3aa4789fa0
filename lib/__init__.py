"""Support code that knows nothing of the papers: checkpoint loading and the offline model build, the project's
file conventions, training checkpoints, torchrun, the chat client, vector files and GGUF, the HTTP side of the
server, the FlexAttention path: what SPEC §2 (loading), §4 (vector files), §5 (checkpoints, torchrun) and §7 (the
judge's client) need around the papers. Nothing here imports a paper file (model.py, hypernet.py, ...): imports go
one way. Modules with a command of their own run from the repository root:

    python -m lib.convert_gguf            # the offline gemma-3-270m folder (once; model.load does it when needed)
"""
