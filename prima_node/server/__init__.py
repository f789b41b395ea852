"""The head node's HTTP API: OpenAI-compatible endpoints, status, events and metrics.

``protocol`` reads OpenAI request bodies into plain requests, ``responses`` writes OpenAI's
response shapes, ``runtime`` runs generations one at a time off the event loop, ``app`` wires
them into an aiohttp application and ``serve`` is the ``prima-node serve`` command. None of them
knows GGUF layouts: the model is reached through ``prima_node.generate.Generator``.
"""
