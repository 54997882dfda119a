"""Serving: an OpenAI-compatible HTTP API and a browser chat over the model `tunepipe chat` loads.

Entry point: `server.serve_command` (`tunepipe serve` / `tunepipe webchat`). `server` loads
the model and builds the app (`app`: routes, auth, errors; `schemas`: the request body);
`engine` batches every active request into one forward pass per step on a background
thread; `generation` carries its tokens onto the event loop; `text` decodes and cuts at stop
strings; `prompts` turns OpenAI messages into the trained chat format and tool calls back
into `tool_calls`; `webchat` is the page.
"""
