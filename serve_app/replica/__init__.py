"""The Llama 2 replica group: the Serve deployment (`deployment.py`), the streams it serves
(`engine_loop.py`), and where its engine runs (`engine_host.py`)."""
