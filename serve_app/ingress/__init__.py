"""The ingress router: the Serve deployment (`deployment.py`), the API's edge (`edge.py`: API keys, body size,
body parsing), and OpenAI's response shapes (`responses.py`)."""
