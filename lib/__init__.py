"""Support code that knows nothing of the papers: checkpoint loading and the offline model build, the project's
file conventions, training checkpoints, torchrun, the chat client, vector files and GGUF, the HTTP side of the
server, the FlexAttention path. Nothing here imports a paper file (model.py, hypernet.py, ...): imports go one way.
"""
