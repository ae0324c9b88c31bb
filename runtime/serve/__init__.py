"""`k2 serve`: the OpenAI and Anthropic APIs over the engine every other command uses.

worker.py owns the model's thread (continuous batching over the engine's slots, prefix reuse), prefix_store.py keeps
finished requests' caches on the host within a budget, metrics.py counts for /metrics and the request log, service.py
turns a conversation into prompt ids and the reply into events (both APIs share it), openai_api.py and
anthropic_api.py speak the two APIs, app.py holds the routes and their errors, server.py binds the socket and runs
uvicorn.
"""
