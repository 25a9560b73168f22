"""An OpenAI-compatible server over the engines: a continuous batch of rows, each request
in its own row with its own position, sampling and deadline (docs in README "Serving")."""
